"""models/row_kernel.py: draftsmith's row-invariant linear kernel (models/row_linear.cpp), built on first use."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from draftsmith.eval.decoder import autoregressive_generate
from draftsmith.models import cpu_linear, row_kernel

from conftest import prompts
from test_batched import sticky_target

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not row_kernel.available(),
                                 reason=f"the row kernel does not build here: {row_kernel.build()}")]

SHAPES = [(576, 576), (1536, 576), (576, 1536), (7, 13), (5, 24), (9, 3)]
"""SmolLM2's, and shapes with a tail: rows not a multiple of the 4-row tile, columns not of the 8 lanes."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_row_is_the_same_bits_at_any_number_of_rows(dtype, threads):
    """The kernel's promise (row_linear.cpp): row m of an M-row call is the row computed alone, for any M, with and
    without bias, on one thread or two. fp32 is where a sum done in another order shows (a mutant whose one-row tile
    added its lanes sequentially failed here in fp32; in bf16 the output's rounding hid it: 0-1 of 16,384 outputs
    differed): bf16 runs the same summing code, and its case checks the widening and the rounding."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, k in SHAPES:
            w, b, x = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype), torch.randn(17, k).to(dtype)
            for bias in (b, None):
                full = row_kernel.linear(x, w, bias)
                for m in (1, 2, 3, 5, 8, 16):
                    assert torch.equal(row_kernel.linear(x[:m], w, bias), full[:m]), (n, k, m)
                    assert torch.equal(row_kernel.linear(x[m].unsqueeze(0), w, bias), full[m:m + 1]), (n, k, m)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_it_computes_the_linear_layer(dtype):
    """fp32 to fp32 rounding of a differently ordered sum; bf16: the fp32 sum of the bf16 values rounded once."""
    torch.manual_seed(1)
    for n, k in SHAPES:
        w, b, x = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype), torch.randn(6, k).to(dtype)
        exact = x.double() @ w.double().t() + b.double()
        got = row_kernel.linear(x, w, b)
        assert got.dtype == dtype and got.shape == (6, n)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)
        else:
            torch.testing.assert_close(got, exact.to(dtype), rtol=2 ** -7, atol=1e-2)   # one bf16 rounding apart


def test_bad_input_is_a_clear_error():
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match=r"rows \[M, K\] and weight \[N, K\], got \[2, 15\] and \[8, 16\]"):
        row_kernel.linear(torch.randn(2, 15), w)
    with pytest.raises(RuntimeError, match="one dtype, got BFloat16 and Float"):
        row_kernel.linear(torch.randn(2, 16).bfloat16(), w)
    with pytest.raises(RuntimeError, match=r"bias \[N\], got \[7\]"):
        row_kernel.linear(torch.randn(2, 16), w, torch.randn(7))
    with pytest.raises(RuntimeError, match="fp32 or bf16, got Half"):
        row_kernel.linear(torch.randn(2, 16).half(), w.half())


def test_the_library_is_named_for_the_cpu_it_was_built_on(monkeypatch):
    """A cache of built libraries shared between machines never hands one CPU's build to another."""
    here = row_kernel.library_name()
    assert re.fullmatch(r"draftsmith_rows_[0-9a-f]{12}", here)
    monkeypatch.setattr(row_kernel, "_cpu_flags", lambda: "flags: fpu sse2 avx512f")
    assert row_kernel.library_name() != here


def test_row_linear_layers_swap_in_and_out_and_keep_the_weights():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 8, bias=False))
    x = torch.randn(3, 5, 24)
    before = model(x)
    layers = [model[0], model[2]]
    assert cpu_linear.pack(model, skip={id(model[2].weight)}, kernel="rows") == 1
    assert type(model[0]) is row_kernel.RowLinear and model[0].weight is layers[0].weight and model[2] is layers[1]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert cpu_linear.unpack(model) == 1 and [model[0], model[2]] == layers


def test_the_compiled_graph_calls_the_kernel_for_every_linear_layer():
    """Every linear layer of a target compiled with `rows` is a RowLinear and its graph calls the kernel's op
    directly, once a layer; decoding equals the eager target's."""
    torch._dynamo.reset()
    target = sticky_target(3.0)
    target.compile(64, linear_kernel="rows")
    linears = 7 * target.num_layers + 1                             # q k v o gate up down a layer, the LM head
    assert sum(type(m) is row_kernel.RowLinear for m in target.model.modules()) == linears
    assert "rows linear layers" in target.compiled.describe() and target.compiled.min_width == 2
    p = prompts(1, length=10)[0]
    out, code = run_and_get_code(autoregressive_generate, target, p, max_new_tokens=6)
    assert out.tokens == autoregressive_generate(sticky_target(3.0), p, max_new_tokens=6).tokens
    assert len(re.findall(r"torch\.ops\.draftsmith_rows\.linear\.default\(", "\n".join(code))) == linears
