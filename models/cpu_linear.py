"""Which matrix kernel the compiled target's linear layers run on this CPU: measured (`draftsmith eval --compile`).

inductor compiles the linear layers of the dynamic-width graph one of two ways: as `mm` calls on the weights as they
are (MKL's sgemm in fp32), or on oneDNN with each weight packed once for it (`PackedLinear`: the packed weight a
buffer of the module, the graph calling oneDNN's packed linear on it, `onednn_linear`). Which is faster depends on the
CPU, and by a lot: on an AMD EPYC (Zen 4) MKL's sgemm over 2-3 rows costs 2-3x one row and 3-8x oneDNN's (SmolLM2's
49,152-row LM head over 3 rows: 34.4 ms vs 4.3, bench/linear_kernels.py), while on the Intel Xeon of earlier
measurements MKL was the faster at 1-3 rows. `measure` times both on the model's own weight shapes at the widths
decoding uses (plain decoding's 1, a verify's 2-8) and the faster is used.

oneDNN's kernel sums one row differently from two or more (for some shapes it splits the reduction when there is a
single row), while each row of a call over 2+ rows is bit-identical whatever the number of rows. So a oneDNN target
runs single-token forwards two rows wide (`min_width`; the second row a copy, written to a spare cache slot and never
committed): plain decoding's rows and a verify's go through the same linear kernel. (Attention is not row-invariant
either way: SDPA's blocking depends on the number of query rows. Lossless decoding is checked, as always.)

The packed weights are inputs of the graph, not constants folded into it (inductor's `freezing`, which packs them
too): a graph with constants is never written to inductor's cache, so every run compiled SmolLM2 afresh (138-199 s
on the AVX2 EPYC of 2026-12-07); a graph over inputs is cached, and a later run with the same model shape, dtype and
torch loads it (23-25 s, dynamo's trace the most of it). Measured paired on SmolLM2 there, a forward costs what the
frozen graph's did (0.98-0.99x at 1-8 tokens; bench/results/cpu-avx2).
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from draftsmith.protocol.proposer import held_modules

WIDTHS = (1, 2, 3, 4, 8)
"""The forward widths the choice weighs alike: plain decoding's single token and a verify's root plus drafts."""


@dataclass
class LinearKernel:
    """The kernel chosen, the narrowest forward it runs (2 for oneDNN: module docstring), and what was measured:
    ms of one forward's linear layers per kernel, summed over WIDTHS."""
    name: str
    min_width: int = 1
    ms: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        timed = ", ".join(f"{k} {v:.1f} ms" for k, v in self.ms.items())
        return f"{self.name} linear layers" + (f" (measured over widths {'/'.join(map(str, WIDTHS))}: {timed})"
                                               if timed else "")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


KERNELS = ("auto", "mm", "onednn")


def choose(model: torch.nn.Module, kernel: str = "auto", reps: int = 3) -> LinearKernel:
    """`kernel`, or for "auto" the faster of `mm` and oneDNN for `model`'s linear layers on this CPU (`mm` off the
    CPU, where oneDNN is missing, or where timing it fails)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown linear kernel {kernel!r}: one of {', '.join(KERNELS)}")
    weight = next(model.parameters())
    if weight.device.type != "cpu" or not onednn_available():
        if kernel == "onednn":
            raise ValueError("the oneDNN linear kernel runs on a CPU torch built with oneDNN only")
        return LinearKernel("mm")
    if kernel != "auto":
        return LinearKernel(kernel, 2 if kernel == "onednn" else 1)
    try:
        ms = measure(model, reps)
    except RuntimeError:              # a oneDNN build without this dtype's packed linear: stay with mm
        return LinearKernel("mm")
    name = min(ms, key=ms.get)
    return LinearKernel(name, 2 if name == "onednn" else 1, ms)


def measure(model: torch.nn.Module, reps: int = 3) -> dict[str, float]:
    """ms of one forward's linear layers (every nn.Linear, by weight shape and count) per kernel, summed over
    WIDTHS."""
    total = {"mm": 0.0, "onednn": 0.0}
    for row in measure_shapes(model, reps):
        for kernel in total:
            total[kernel] += row["count"] * row[kernel]
    return {k: round(v, 2) for k, v in total.items()}


@torch.inference_mode()
def measure_shapes(model: torch.nn.Module, reps: int = 3, widths=WIDTHS) -> list[dict]:
    """Per weight shape and width: ms of one `mm` call and of one oneDNN call (a single row run two rows wide, as
    the compiled target runs it), the median of `reps` calls after a warm-up call; `count` layers of that shape."""
    shapes = Counter()
    weights = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shapes[tuple(module.weight.shape)] += 1
            weights.setdefault(tuple(module.weight.shape), module.weight)
    rows = []
    for shape, count in shapes.items():
        w = weights[shape]
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        for width in widths:
            x = torch.randn(width, shape[1], dtype=w.dtype)
            x2 = torch.randn(max(width, 2), shape[1], dtype=w.dtype)
            rows.append(dict(shape=shape, count=count, width=width,
                             mm=_median_ms(lambda: torch.mm(x, w.t()), reps),
                             onednn=_median_ms(lambda: torch.ops.mkldnn._linear_pointwise(
                                 x2, packed, None, "none", [], ""), reps)))
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
    without, its reorder refuses bf16 and such layers stay nn.Linear, run by `mm`)."""
    return dtype == torch.float32 or dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack(module: torch.nn.Module, skip: Collection[int] = ()) -> int:
    """Swap every nn.Linear in `module` whose dtype oneDNN packs here for a PackedLinear, except those whose weight
    is in `skip` (by id). Returns how many were swapped."""
    swapped = 0
    for parent, name, child in _children(module):
        if type(child) is torch.nn.Linear and id(child.weight) not in skip and packable(child.weight.dtype):
            setattr(parent, name, PackedLinear(child))
            swapped += 1
    return swapped


def unpack(module: torch.nn.Module) -> int:
    """Put back the nn.Linear each PackedLinear in `module` replaced (a target compiled again with `mm`). Returns
    how many."""
    restored = 0
    for parent, name, child in _children(module):
        if type(child) is PackedLinear:
            setattr(parent, name, child.linear[0])
            restored += 1
    return restored


def _children(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, name, child) for every submodule of `module`, listed before any is swapped."""
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()]


def pack_drafter(proposer, skip: set[int]) -> int:
    """Pack every nn.Linear a proposer holds (its modules', and its members' for a composite), except those whose
    weight is in `skip` (the target's parameters, by id: the target's layers are its own to pack). Returns how many
    were swapped. The drafter runs eagerly: this gives its linear layers the kernel the target's measured faster."""
    return sum(pack(module, skip) for module in held_modules(proposer))
