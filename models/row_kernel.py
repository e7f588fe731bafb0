"""draftsmith's own row-invariant linear kernel for CPU decoding (models/row_linear.cpp), built on first use.

A decoding step sends 1-16 rows through each linear layer: memory-bound work, where the time is reading the weights.
The kernel reads each weight row once per call and sums every output `y[m, n]` in one fixed order whatever the
number of rows (the .cpp's header): a verify's rows are plain decoding's bit for bit, as lossless speculative
decoding needs, and one row sums as any other (oneDNN's single-row kernel does not; the compiled target still runs
single tokens two rows wide, for its graph's sake: models/cpu_linear.py).
fp32 and bf16 weights; bf16 is widened to fp32 on load, so a CPU without bf16 arithmetic (AVX2) streams half the
bytes and computes in fp32. Measured against oneDNN and `mm` on the model's own shapes by `cpu_linear.choose`,
like the others.

The op is `torch.ops.draftsmith_rows.linear(rows [M, K], weight [N, K], bias [N] | None) -> [M, N]`, a dispatcher
op with a fake implementation, so a compiled graph calls it as it calls oneDNN's. `build()` compiles the .cpp with
torch's extension builder (a C++ compiler and ninja; ~15 s, once per machine: the library is cached under
`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions, named for this CPU's instruction set, the source and
torch, so a cache shared between machines never loads a library built for another CPU). Where it cannot be built
`available()` says why and the choice stays with oneDNN or `mm`.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("row_linear.cpp")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++17")
"""-march=native: the build is for the machine it runs on (the library's name says which); -ffp-contract=off: no
fused multiply-add but the kernel's own (the sum order is the point); -fopenmp: torch's thread pool (at::parallel_for
is OpenMP in torch's CPU builds; the symbols resolve to the runtime torch loaded)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def library_name() -> str:
    """The built library's name: the source, the flags, torch's version and this CPU's instruction set in a hash."""
    key = "\n".join([SOURCE.read_text(), " ".join(FLAGS), torch.__version__, _cpu_flags()])
    return "draftsmith_rows_" + hashlib.sha256(key.encode()).hexdigest()[:12]


@functools.cache
def build() -> str | None:
    """Compile (or find cached) and load the kernel. None when loaded, else why it could not be (no compiler, no
    ninja, not a CPU torch, ...)."""
    if not hasattr(torch.ops, "draftsmith_rows") or not hasattr(torch.ops.draftsmith_rows, "linear"):
        try:
            from torch.utils.cpp_extension import load
            name = library_name()
            if not _built(name):
                print("[draftsmith] building the row-invariant linear kernel (models/row_linear.cpp; once per "
                      "machine, ~15 s) ...", file=sys.stderr, flush=True)
            load(name, sources=[str(SOURCE)], extra_cflags=list(FLAGS), is_python_module=False, verbose=False)
        except Exception as e:                   # any failure of the toolchain: the kernel is just not offered
            return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    _register_fake()
    return None


def _built(name: str) -> bool:
    """Whether the library is in torch's extension cache already (then `build` only loads it)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:                            # a torch without the helper: say "building" anyway
        return False


def available() -> bool:
    return build() is None


@functools.cache
def _register_fake() -> None:
    @torch.library.register_fake("draftsmith_rows::linear")
    def _(rows, weight, bias):
        return rows.new_empty(rows.shape[0], weight.shape[0])


def linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel over `rows` (2-D); `build()` first."""
    return torch.ops.draftsmith_rows.linear(rows, weight, bias)


class RowLinear(torch.nn.Module):
    """An inference-only nn.Linear on the row-invariant kernel. It holds the layer's own weight and bias (nothing
    packed or copied) and the layer it replaces, for `cpu_linear.unpack`."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = [linear]                   # a list: not a submodule
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.draftsmith_rows.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)
