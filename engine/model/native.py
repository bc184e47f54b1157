"""kvmini's own CPU kernels (engine/model/csrc/quant_mm.cpp): built once per machine with its C++ compiler, loaded
as torch.library ops, and PyTorch's kernels where they cannot be had.

`kvmini_native::int4_linear(x, codes, scales_zeros)` and `kvmini_native::int8_linear(x, weight, scales)`
multiply int8-quantized activations by 4-bit / 8-bit weights with AVX2 integer dot products, as llama.cpp's
Q4_1 x Q8_1 and Q8_0 x Q8_0 do; docs/PERFORMANCE.md has their speed and rounding. The
library is compiled on first use (about 20 s; `make setup` does it ahead) into
`$KVMINI_HOME/kernels/` (default `~/.cache/kvmini/kernels/`), one file per source, flags and torch
version, and reused by every later process. `KVMINI_NATIVE=0` turns it off, as do a CPU without AVX2, a
missing compiler or a failed build: each says why once on stderr, and the quantized layers keep PyTorch's
`_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.paths import kvmini_home

SOURCE = Path(__file__).resolve().parent / "csrc" / "quant_mm.cpp"
CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-mavx2", "-mfma", "-fopenmp")
CPU_CAPABILITIES = ("AVX2", "AVX512")  # torch's names for CPUs that run AVX2 code
DISABLE_ENV = "KVMINI_NATIVE"


@dataclass(frozen=True)
class NativeKernels:
    """Whether the library is loaded, and why not when it is not."""

    available: bool
    reason: str = ""


def library_path() -> Path:
    """Where the built library lives: its name hashes the source, the flags and the torch build."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(CXX_FLAGS).encode())
    key.update(f"{torch.__version__} {torch._C._GLIBCXX_USE_CXX11_ABI}".encode())
    return kvmini_home() / "kernels" / f"kvmini_native-{key.hexdigest()[:16]}.so"


def build(target: Path) -> None:
    """Compile engine/model/csrc/quant_mm.cpp into `target` (written to a temporary file, then renamed, so that a
    concurrent or interrupted build never leaves a half-written library behind)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    target.parent.mkdir(parents=True, exist_ok=True)
    lib_dirs = library_paths()
    command = [os.environ.get("CXX", "g++"), *CXX_FLAGS, str(SOURCE),
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{p}" for p in include_paths()), *(f"-L{p}" for p in lib_dirs),
               *(f"-Wl,-rpath,{p}" for p in lib_dirs), "-lc10", "-ltorch_cpu", "-ltorch"]
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([*command, "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _linear_shape(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@functools.cache
def native_kernels() -> NativeKernels:
    """Load the library (building it first when this machine has none): once per process."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return NativeKernels(False, f"{DISABLE_ENV}=0")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in CPU_CAPABILITIES:
        return _unavailable(f"this CPU runs {capability} code, the kernels need AVX2")
    target = library_path()
    try:
        if not target.exists():
            print(f"kvmini: building the int8/int4 kernels into {target} (once per machine) ...", file=sys.stderr)
            build(target)
        torch.ops.load_library(str(target))
        for op in ("int4_linear", "int8_linear"):  # shapes for torch.compile's tracing (engine/model/compiled.py)
            torch.library.register_fake(f"kvmini_native::{op}", _linear_shape)
    except (OSError, RuntimeError) as e:
        return _unavailable(f"could not build or load {target.name}: {e}")
    return NativeKernels(True)


def _unavailable(reason: str) -> NativeKernels:
    print(f"kvmini: native kernels off ({reason}); int8/int4 layers use PyTorch's kernels", file=sys.stderr)
    return NativeKernels(False, reason)


def main() -> None:
    """Build (or find) the library and say which kernels the quantized layers use (`make setup` runs this)."""
    kernels = native_kernels()
    print(f"native int8/int4 kernels: {library_path()}" if kernels.available else f"native kernels off: {kernels.reason}")
