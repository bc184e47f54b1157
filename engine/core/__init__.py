"""Layer 0, what every layer uses: errors, the outputs a request returns, the model config (`ModelConfig`), the
argument checks (checks.py), where kvmini keeps its files (paths.py) and the process group tensor-parallel
ranks talk over (comm.py). Imports nothing else of kvmini."""
