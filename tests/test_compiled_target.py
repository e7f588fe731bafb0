"""--compile (models/compiled_target.py): the static cache and the compiled forward decode what eager decodes."""

import pytest
import torch

from draftsmith.errors import DraftsmithError
from draftsmith.eval.decoder import autoregressive_generate, speculative_generate
from draftsmith.models import compiled_target
from draftsmith.models.compiled_target import StaticKV
from draftsmith.models.eagle3 import Eagle3Proposer
from draftsmith.protocol.drafting import TreeShape

from conftest import prompts
from test_batched import sticky_target
from test_eagle3 import random_head

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


@pytest.fixture(scope="module")
def pair():
    """The same tiny target twice: eager, and compiled with a 64-slot static cache."""
    eager, fast = sticky_target(3.0), sticky_target(3.0)
    fast.compile(64)
    return eager, fast


def test_compiled_decoding_equals_eager_decoding(pair):
    eager, fast = pair
    head = random_head(eager)
    for name, tree in [("chain", None), ("tree", TreeShape.parse("dynamic:4,3,10"))]:
        accepted = 0
        for p in prompts(3, length=10, seed=4):
            plain = autoregressive_generate(eager, p, max_new_tokens=20)
            assert autoregressive_generate(fast, p, max_new_tokens=20).tokens == plain.tokens
            a = speculative_generate(eager, Eagle3Proposer(head, eager.model), p, k=4, tree=tree, max_new_tokens=20)
            b = speculative_generate(fast, Eagle3Proposer(head, fast.model), p, k=4, tree=tree, max_new_tokens=20)
            assert b.tokens == a.tokens == plain.tokens and b.accepted == a.accepted, name
            accepted += sum(b.accepted)
        assert accepted > 0, name
    assert fast.compiled.fallback is None and fast.compiled.compiled is not None


def test_the_last_layer_tap_is_the_output_before_the_final_norm(pair):
    eager, fast = pair
    layers = (0, -1)                       # EAGLE-1 reads the last layer's output before the norm
    ids = prompts(1, length=12, seed=9)[0]
    a = eager.forward(ids, eager.new_cache(), layers)
    cache = fast.new_cache()
    b = fast.forward(ids, cache, layers)
    assert isinstance(cache, StaticKV) and cache.length == len(ids)
    for x, y in zip(a.hidden, b.hidden):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)


def test_keep_and_rollback_leave_the_cache_as_eager_leaves_it(pair):
    eager, fast = pair
    ctx = prompts(1, length=8, seed=2)[0]
    draft, parents, rows = [11, 12, 13, 14, 15], [-1, -1, 0, 1], [0, 2, 3]
    ce, cf = eager.new_cache(), fast.new_cache()
    for t, c in ((eager, ce), (fast, cf)):
        t.forward(ctx, c)
        t.forward(draft, c, parents=parents)
        t.keep(c, len(ctx), rows)
    assert cf.length == len(ctx) + len(rows)
    nxt = [21, 22, 23]
    torch.testing.assert_close(fast.forward(nxt, cf).logits, eager.forward(nxt, ce).logits, rtol=1e-4, atol=1e-4)
    fast.rollback(cf, len(ctx))
    eager.rollback(ce, len(ctx))
    torch.testing.assert_close(fast.forward(nxt, cf).logits, eager.forward(nxt, ce).logits, rtol=1e-4, atol=1e-4)


def test_a_full_static_cache_is_a_clear_error(pair):
    _, fast = pair
    cache = fast.new_cache()
    with pytest.raises(DraftsmithError, match="static cache is full"):
        fast.forward(list(range(3, 70)), cache)


def test_a_failed_compile_warns_and_runs_eager(monkeypatch):
    target = sticky_target(3.0)
    target.compile(64)

    class InductorError(Exception):
        pass
    InductorError.__module__ = "torch._inductor.exc"

    def broken(*args, **kwargs):
        def run(*a, **k):
            raise InductorError("no C++ compiler found")
        return run
    monkeypatch.setattr(compiled_target.torch, "compile", broken)
    p = prompts(1, length=10)[0]
    with pytest.warns(UserWarning, match="torch.compile failed"):
        out = autoregressive_generate(target, p, max_new_tokens=8)
    assert out.tokens == autoregressive_generate(sticky_target(3.0), p, max_new_tokens=8).tokens
    assert "no C++ compiler" in target.compiled.fallback
