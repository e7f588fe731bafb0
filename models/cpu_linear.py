"""Which matrix kernel the compiled target's linear layers run on this CPU: measured (`draftsmith eval --compile`).

inductor compiles the linear layers of the dynamic-width graph one of three ways: as `mm` calls on the weights as
they are (MKL's sgemm in fp32); on oneDNN with each weight packed once for it (`PackedLinear`: the packed weight a
buffer of the module, the graph calling oneDNN's packed linear on it, `onednn_linear`); or on draftsmith's own
row-invariant kernel (`rows`: models/row_kernel.py, a `RowLinear` on the weight as it is). Which is faster depends
on the CPU, and by a lot: on an AMD EPYC (Zen 4) MKL's sgemm over 2-3 rows costs 2-3x one row and 3-8x oneDNN's
(SmolLM2's 49,152-row LM head over 3 rows: 34.4 ms vs 4.3, bench/linear_kernels.py), while on the Intel Xeon of
earlier measurements MKL was the faster at 1-3 rows; on the AVX2 EPYC of 2026-12-07 `rows` read SmolLM2's weights
fastest at 1-8 rows, and in bf16, which neither oneDNN nor MKL computes natively there, streams half the bytes.
`measure` times each kernel this CPU has on the model's own weight shapes at the widths decoding uses (plain
decoding's 1, a verify's 2-8) and the fastest is used.

oneDNN's kernel sums one row differently from two or more (for some shapes it splits the reduction when there is a
single row), while each row of a call over 2+ rows is bit-identical whatever the number of rows. So a oneDNN target
runs single-token forwards two rows wide (`min_width`; the second row a copy, written to a spare cache slot and never
committed): plain decoding's rows and a verify's go through the same linear kernel. `rows` sums every row alike from
one row up, but its target runs single tokens two rows wide too: dynamo compiles a one-row forward as a graph of its
own, whose fused pointwise work (the MLP's) rounds otherwise than the dynamic-width graph's (bench/results/cpu-avx2,
"rowdot"). (Attention is not row-invariant either way: SDPA's blocking depends on the number of query rows:
models/row_attention.py. Lossless decoding is checked, as always.)

The packed weights are inputs of the graph, not constants folded into it (inductor's `freezing`, which packs them
too): a graph with constants is never written to inductor's cache, so every run compiled SmolLM2 afresh (138-199 s
on the AVX2 EPYC of 2026-12-07); a graph over inputs is cached, and a later run with the same model shape, dtype and
torch loads it (23-25 s, dynamo's trace the most of it). Measured paired on SmolLM2 there, a forward costs what the
frozen graph's did (0.98-0.99x at 1-8 tokens; bench/results/cpu-avx2).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from draftsmith.models import row_kernel
from draftsmith.protocol.proposer import held_modules

WIDTHS = (1, 2, 3, 4, 8)
"""The forward widths the choice weighs alike: plain decoding's single token and a verify's root plus drafts."""


@dataclass
class LinearKernel:
    """The kernel chosen, the narrowest forward it runs (MIN_WIDTH), and what was measured: ms of one forward's
    linear layers per kernel, summed over WIDTHS."""
    name: str
    ms: dict[str, float] = field(default_factory=dict)

    @property
    def min_width(self) -> int:
        return MIN_WIDTH[self.name]

    def describe(self) -> str:
        timed = ", ".join(f"{k} {v:.1f} ms" for k, v in self.ms.items())
        return f"{self.name} linear layers" + (f" (measured over widths {'/'.join(map(str, WIDTHS))}: {timed})"
                                               if timed else "")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


KERNELS = ("auto", "mm", "onednn", "rows")
MIN_WIDTH = {"mm": 1, "onednn": 2, "rows": 2}
"""The narrowest forward each kernel's target runs (module docstring)."""


def runs(kernel: str, dtype: torch.dtype) -> bool:
    """Whether this CPU runs `kernel` for weights of `dtype`: `mm` always; oneDNN where torch has it and packs the
    dtype; `rows` (fp32, bf16) where it builds (models/row_kernel.py, built on the first ask)."""
    if kernel == "onednn":
        return onednn_available() and packable(dtype)
    if kernel == "rows":
        return dtype in (torch.float32, torch.bfloat16) and row_kernel.available()
    return kernel == "mm"


def kernels_here(dtype: torch.dtype) -> list[str]:
    """The kernels this CPU runs for weights of `dtype` (`runs`)."""
    return [kernel for kernel in MIN_WIDTH if runs(kernel, dtype)]


def choose(model: torch.nn.Module, kernel: str = "auto", reps: int = 3) -> LinearKernel:
    """`kernel`, or for "auto" the fastest of the kernels this CPU has for `model`'s linear layers (`mm` off the
    CPU)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown linear kernel {kernel!r}: one of {', '.join(KERNELS)}")
    weight = next(model.parameters())
    here = kernels_here(weight.dtype) if weight.device.type == "cpu" else ["mm"]
    if kernel not in here and kernel != "auto":
        why = {"onednn": f"oneDNN's packed linear for {weight.dtype} on this CPU torch",
               "rows": f"draftsmith's row kernel: fp32 or bf16 weights (this model's are {weight.dtype}) on a CPU "
                       f"where it builds ({row_kernel.build() or 'it builds here'}; models/row_kernel.py)"}[kernel]
        raise ValueError(f"the {kernel} linear kernel needs {why}: this run has {', '.join(here)}")
    if kernel != "auto":
        return LinearKernel(kernel)
    if len(here) == 1:
        return LinearKernel("mm")
    ms = measure(model, reps, here)
    name = min(ms, key=ms.get)
    return LinearKernel(name, ms)


def measure(model: torch.nn.Module, reps: int = 3, kernels: Collection[str] | None = None) -> dict[str, float]:
    """ms of one forward's linear layers (every nn.Linear, by weight shape and count) per kernel (by default those
    this CPU runs in the model's dtype), summed over WIDTHS."""
    kernels = kernels or kernels_here(next(model.parameters()).dtype)
    total = dict.fromkeys(kernels, 0.0)
    for row in measure_shapes(model, reps, kernels=kernels):
        for kernel in total:
            total[kernel] += row["count"] * row[kernel]
    return {k: round(v, 2) for k, v in total.items()}


def linear_weights(model: torch.nn.Module) -> dict[tuple[int, int], list[torch.Tensor]]:
    """Every nn.Linear weight of `model`, by [out, in] shape (in the order the model holds them)."""
    out: dict[tuple[int, int], list[torch.Tensor]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            out.setdefault(tuple(module.weight.shape), []).append(module.weight)
    return out


@torch.inference_mode()
def measure_shapes(model: torch.nn.Module, reps: int = 3, widths=WIDTHS,
                   kernels: Collection[str] | None = None) -> list[dict]:
    """Per weight shape and width: ms of one call of each kernel (by default those this CPU runs in the model's
    dtype; a single row run as wide as the kernel's target runs it, MIN_WIDTH), the median of `reps` calls after a
    warm-up call; `count` layers of that shape."""
    kernels = kernels or kernels_here(next(model.parameters()).dtype)
    rows = []
    for shape, weights in linear_weights(model).items():
        count, w = len(weights), weights[0].detach()
        calls = {"mm": lambda x: torch.mm(x, w.t()), "rows": lambda x: row_kernel.linear(x, w)}
        if "onednn" in kernels:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            calls["onednn"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        for width in widths:
            row = dict(shape=shape, count=count, width=width)
            for kernel in kernels:
                x = torch.randn(max(width, MIN_WIDTH[kernel]), shape[1], dtype=w.dtype)
                row[kernel] = _median_ms(lambda: calls[kernel](x), reps)
            rows.append(row)
    return rows


def _median_ms(call, reps: int) -> float:
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


@torch.library.custom_op("draftsmith::onednn_linear", mutates_args=(),
                         schema="(Tensor rows, Tensor packed, Tensor? bias) -> Tensor")
def onednn_linear(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear over `rows` (2-D) with a weight packed by `_reorder_linear_weight`. An op of its own for the
    compiled graph: inductor lowers oneDNN's packed linear only for weights frozen into the graph as constants
    (module docstring); `lower_to_onednn` has it call oneDNN's op for this one directly."""
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _(rows, packed, bias):
    return rows.new_empty(rows.shape[0], packed.shape[0])


@functools.cache
def lower_to_onednn() -> bool:
    """Have inductor's graph call oneDNN's packed linear for `onednn_linear` directly (an extern kernel, as for its
    own frozen weights) rather than the op's Python body (~8-25 us more a call, 211 calls a SmolLM2 forward:
    measured on the AVX2 EPYC). False where this torch's inductor lacks the hooks: the body then runs, same result."""
    try:
        from torch._inductor.lowering import fallback_handler, register_lowering
    except ImportError:
        return False
    linear = fallback_handler(torch.ops.mkldnn._linear_pointwise.default, add_to_fallback_set=False)
    register_lowering(torch.ops.draftsmith.onednn_linear.default, type_promotion_kind=None)(
        lambda rows, packed, bias: linear(rows, packed, bias, "none", [], ""))
    return True


class PackedLinear(torch.nn.Module):
    """An inference-only nn.Linear on oneDNN: the weight packed once (a buffer, not saved); a single row runs two
    rows wide (oneDNN's single-row kernel is the slower, module docstring). `weight` and `bias` stay readable."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = [linear]                   # the layer it replaces, for `unpack` (a list: not a submodule)
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        one = rows.shape[0] == 1
        if one:
            rows = rows.expand(2, -1)
        if torch.compiler.is_compiling():
            y = onednn_linear(rows.contiguous(), self.packed, self.bias)
        else:                                    # eager (a drafter): the op itself, without a custom op's dispatch
            y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), self.packed, self.bias, "none", [], "")
        return (y[:1] if one else y).reshape(*x.shape[:-1], self.out_features)


def packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of `dtype` here: fp32, and bf16 where the CPU computes it (AVX512-BF16, AMX;
    without, its reorder refuses bf16)."""
    return dtype == torch.float32 or dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


LAYERS = {"onednn": PackedLinear, "rows": row_kernel.RowLinear}
"""The layer each kernel swaps an nn.Linear for (`pack`); `mm` keeps nn.Linear."""


def pack(module: torch.nn.Module, skip: Collection[int] = (), kernel: str = "onednn") -> int:
    """Swap every nn.Linear in `module` that `kernel` runs here (`runs`, by weight dtype) for the kernel's layer
    (LAYERS), except those whose weight is in `skip` (by id). Returns how many were swapped."""
    swapped = 0
    for parent, name, child in _children(module):
        if type(child) is torch.nn.Linear and id(child.weight) not in skip and runs(kernel, child.weight.dtype):
            setattr(parent, name, LAYERS[kernel](child))
            swapped += 1
    return swapped


def unpack(module: torch.nn.Module) -> int:
    """Put back the nn.Linear each kernel's layer in `module` replaced (a target compiled again with another
    kernel). Returns how many."""
    restored = 0
    for parent, name, child in _children(module):
        if type(child) in LAYERS.values():
            setattr(parent, name, child.linear[0])
            restored += 1
    return restored


def _children(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, name, child) for every submodule of `module`, listed before any is swapped."""
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()]


def pack_drafter(proposer, skip: set[int], kernel: str = "onednn") -> int:
    """Swap every nn.Linear a proposer holds (its modules', and its members' for a composite) for `kernel`'s layer,
    except those whose weight is in `skip` (the target's parameters, by id: the target's layers are its own to
    swap). Returns how many were swapped. The drafter runs eagerly: this gives its linear layers the kernel the
    target's measured faster."""
    return sum(pack(module, skip, kernel) for module in held_modules(proposer))
