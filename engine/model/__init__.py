"""Layer 4, the network: the LLaMA-family model (llama.py), paged attention (attention.py), the linear layers
(oneDNN-packed dense, int8/int4 with kvmini's own kernels: packed_linear.py, quant.py, native.py, csrc/),
batch invariance (invariance.py), checkpoints and GGUF import, and the compiled decode step (compiled.py)."""
