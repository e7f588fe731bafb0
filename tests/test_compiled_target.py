"""--compile (models/compiled_target.py): the static cache and the compiled forward decode what eager decodes."""

import re

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from draftsmith.errors import DraftsmithError
from draftsmith.eval.batched import batched_generate
from draftsmith.eval.decoder import NoDraft, StepDraft, autoregressive_generate, speculative_generate
from draftsmith.models import compiled_target, cpu_linear, row_attention
from draftsmith.models.compiled_target import StaticKV
from draftsmith.models.static_rows import StaticRows
from draftsmith.models.target import Target
from draftsmith.models.eagle3 import Eagle3Proposer
from draftsmith.protocol.drafting import TreeShape

from conftest import prompts
from test_batched import DRAFTERS, assert_rows_decode_alone, decoded_alone, ragged_prompts, sticky_target
from test_eagle3 import random_head

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


KERNELS = cpu_linear.kernels_here(torch.float32)
FAST = [k for k in ("rows", "onednn") if k in KERNELS]
"""The row-invariant kernels this CPU runs in fp32 (draftsmith's own first, then oneDNN's)."""


def exact_kernels(*dtypes):
    """(kernel, dtype) for each row-invariant kernel (draftsmith's rows, oneDNN) this CPU runs in each dtype: those
    whose verify rows are plain decoding's bit for bit (models/cpu_linear.py)."""
    return [pytest.param(k, d, id=f"{k}-{str(d).removeprefix('torch.')}") for d in dtypes for k in ("rows", "onednn")
            if k in cpu_linear.kernels_here(d)]


def compiled(kernel: str, boost: float = 3.0):
    """A tiny target compiled with a 64-slot static cache, its linear layers on `kernel` whatever this CPU
    measured faster (a fresh dynamo, so no earlier test's graphs count against its recompile limit)."""
    torch._dynamo.reset()
    target = sticky_target(boost)
    target.compile(64, linear_kernel=kernel)
    return target


@pytest.fixture(scope="module", params=["mm"] + FAST[:1])
def pair(request):
    """The same tiny target twice: eager, and compiled (with `mm`, then with the first row-invariant kernel; the
    other's decoding is checked by its own tests below)."""
    return sticky_target(3.0), compiled(request.param)


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



@pytest.mark.skipif("onednn" not in KERNELS, reason="this torch has no oneDNN")
def test_onednn_weights_are_packed_into_the_layers_and_the_graph_is_cached(capsys):
    """oneDNN's packed weights are the layers' buffers, inputs of the graph, which calls oneDNN's packed linear on
    them directly (not the custom op's Python body); not frozen into it as constants, the graph is written to
    inductor's cache, and a second target of the same shape loads it and decodes the same."""
    target = compiled("onednn")
    assert not any(type(m) is torch.nn.Linear for m in target.model.modules())
    linears = 7 * target.num_layers + 1                             # q k v o gate up down a layer, the LM head
    assert sum(type(m) is cpu_linear.PackedLinear for m in target.model.modules()) == linears
    p = prompts(1, length=10)[0]
    out, code = run_and_get_code(autoregressive_generate, target, p, max_new_tokens=6)    # compiles afresh
    plain = autoregressive_generate(sticky_target(3.0), p, max_new_tokens=6).tokens
    assert out.tokens == plain and target.compiled.fallback is None
    code = "\n".join(code)
    assert len(re.findall(r"= torch\.ops\.mkldnn\._linear_pointwise\.default\(", code)) == linears
    assert not re.search(r"torch\.ops\.draftsmith\.onednn_linear\.default\(", code)
    autoregressive_generate(compiled("onednn"), p, max_new_tokens=6)           # written to the cache (or there)
    counters["inductor"].clear()
    again = compiled("onednn")
    assert autoregressive_generate(again, p, max_new_tokens=6).tokens == plain
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_bypass"] == 0
    assert "[draftsmith] compiled the target's forward for any width in" in capsys.readouterr().err


def test_a_second_compile_with_mm_puts_the_plain_linear_layers_back():
    target = sticky_target(3.0)
    linears = [m for m in target.model.modules() if type(m) is torch.nn.Linear]
    for kernel in FAST:
        target.compile(64, linear_kernel=kernel)
        assert all(type(m) is cpu_linear.LAYERS[kernel] for m in target.model.modules()
                   if isinstance(m, (torch.nn.Linear, *cpu_linear.LAYERS.values())))
    target.compile(64, linear_kernel="mm")
    assert [m for m in target.model.modules() if type(m) is torch.nn.Linear] == linears


def test_a_single_token_forward_commits_one_slot_and_returns_one_row(pair):
    """With oneDNN or rows a single-token forward runs two rows wide (a copy of its row, written to the spare slot
    and never committed); any kernel: its row is the wide forward's row, and the next forward sees the same cache."""
    _, target = pair
    ctx, new = prompts(1, length=9, seed=5)[0], [7, 8, 9, 10, 11]
    one, wide = target.new_cache(), target.new_cache()
    target.forward(ctx, one, last_only=True)
    target.forward(ctx, wide, last_only=True)
    singles = [target.forward([t], one, (0, -1)) for t in new]
    rows = target.forward(new, wide, (0, -1))
    assert one.length == wide.length == len(ctx) + len(new)
    for i, s in enumerate(singles):
        assert s.logits.shape[0] == 1 and all(h.shape[0] == 1 for h in s.hidden)
        torch.testing.assert_close(s.logits[0], rows.logits[i], rtol=1e-5, atol=1e-5)
        for a, b in zip(s.hidden, rows.hidden):
            torch.testing.assert_close(a[0], b[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target.forward([12, 13], one).logits, target.forward([12, 13], wide).logits,
                               rtol=1e-5, atol=1e-5)
    full = target.new_cache()
    target.forward(list(range(3, 3 + 63)), full, last_only=True)
    target.forward([5], full)                 # the last slot: its pad row goes to the spare one
    assert full.length == 64
    assert target.compiled.fallback is None

def test_the_kernel_is_measured_and_the_fastest_one_is_used(monkeypatch):
    model = sticky_target(3.0).model
    ms = cpu_linear.measure(model, reps=1)
    assert set(ms) == set(KERNELS) and all(v > 0 for v in ms.values())
    monkeypatch.setattr(cpu_linear, "kernels_here", lambda dtype: ["mm", "onednn", "rows"])
    monkeypatch.setattr(cpu_linear, "measure", lambda m, reps, kernels: {"mm": 2.0, "onednn": 1.0, "rows": 1.5})
    chosen = cpu_linear.choose(model)
    assert (chosen.name, chosen.min_width) == ("onednn", 2)
    assert "onednn 1.0 ms" in chosen.describe() and "rows 1.5 ms" in chosen.describe()
    monkeypatch.setattr(cpu_linear, "measure", lambda m, reps, kernels: {"mm": 1.0, "onednn": 2.0, "rows": 3.0})
    assert (cpu_linear.choose(model).name, cpu_linear.choose(model).min_width) == ("mm", 1)
    monkeypatch.setattr(cpu_linear, "measure", lambda m, reps, kernels: {"mm": 2.0, "onednn": 2.0, "rows": 0.5})
    assert (cpu_linear.choose(model).name, cpu_linear.choose(model).min_width) == ("rows", 2)
    assert (cpu_linear.choose(model, "onednn").name, cpu_linear.choose(model, "onednn").ms) == ("onednn", {})
    with pytest.raises(ValueError, match="unknown linear kernel 'mkl'"):
        cpu_linear.choose(model, "mkl")
    monkeypatch.setattr(cpu_linear, "kernels_here", lambda dtype: ["mm"])
    assert cpu_linear.choose(model).name == "mm"
    with pytest.raises(ValueError, match="the onednn linear kernel needs oneDNN's packed linear for torch.float32.*"
                                         "this run has mm"):
        cpu_linear.choose(model, "onednn")
    with pytest.raises(ValueError, match="the rows linear kernel needs draftsmith's row kernel: fp32 or bf16 weights "
                                         r"\(this model's are torch.float32\)"):
        cpu_linear.choose(model, "rows")


def test_kernels_here_follow_the_dtype():
    """oneDNN packs fp32 (and bf16 only where the CPU computes it); the row kernel runs fp32 and bf16, not fp16."""
    assert cpu_linear.kernels_here(torch.float16) == ["mm"]
    bf16 = cpu_linear.kernels_here(torch.bfloat16)
    assert ("onednn" in bf16) == (cpu_linear.onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert ("rows" in bf16) == ("rows" in KERNELS)


@pytest.mark.parametrize("kernel", FAST)
def test_a_drafter_runs_the_target_kernel_and_decoding_stays_lossless(kernel):
    """With a kernel that swaps layers (oneDNN, rows) the drafter's own linear layers run it too (the target's, by
    its compile); with mm nothing is swapped."""
    target = compiled(kernel)
    head = random_head(target)
    plain_proposer = Eagle3Proposer(random_head(target), target.model)
    plain_proposer.head.load_state_dict(head.state_dict())
    proposer = Eagle3Proposer(head, target.model)
    assert target.pack_drafter(proposer) == sum(isinstance(m, torch.nn.Linear) for m in random_head(target).modules())
    assert isinstance(head.lm_head, cpu_linear.LAYERS[kernel])
    assert not any(type(m) is torch.nn.Linear for m in target.model.modules())     # the target's swapped by compile
    for p in prompts(3, length=10, seed=4):
        plain = autoregressive_generate(target, p, max_new_tokens=20)
        a = speculative_generate(target, plain_proposer, p, k=4, max_new_tokens=20)
        b = speculative_generate(target, proposer, p, k=4, max_new_tokens=20)
        assert b.tokens == a.tokens == plain.tokens and b.accepted == a.accepted
    assert compiled("mm").pack_drafter(Eagle3Proposer(random_head(target), target.model)) == 0


@pytest.mark.parametrize("names,kernel", [(("eagle3-chain", "lookup+eagle3"), (FAST or KERNELS)[0]),
                                          (("dspark-block",), (FAST or KERNELS)[-1]), (("lookup+eagle3",), "mm")],
                         ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_compiled_batched_decoding_equals_compiled_batch_one_per_row(kernel, names):
    """--compile --batch-size: every row through the compiled graph and a static cache of rows (models/static_rows.py)
    decodes what the compiled batch-1 decoder decodes: chains, a tree, a block drafter; prompts of different lengths,
    rows ending at different steps (one at its first token), waiting prompts joining. Drafters that share a target
    share its compiled graphs (a compile is most of such a test's time)."""
    boosts = {DRAFTERS[name][2] for name in names}
    assert len(boosts) == 1, f"{names} want different targets: {boosts}"
    target = compiled(kernel, boosts.pop())
    assert isinstance(target.new_batch_cache(), StaticRows)
    for name in names:
        proposer, tree, batch, plain, eos, single = decoded_alone(target, name)
        for size in (2, 4):                           # 6 prompts, 5 take a row: joins at both sizes
            assert_rows_decode_alone(target, proposer, tree, batch, eos, single, size)
            lone = batched_generate(target, NoDraft(), batch, batch_size=size, k=0, max_new_tokens=20,
                                    eos_token_ids=eos)
            assert [r.tokens for r in lone] == [r.tokens[: len(s.tokens)] for r, s in zip(plain, single)], (name, size)
        assert 0 < sum(map(sum, (r.accepted for r in single))) < sum(map(sum, (r.proposed for r in single))), name
    assert target.compiled.fallback is None


def test_static_rows_write_each_row_at_its_own_slots_and_keep_compacts(pair):
    """A verify step writes row r's tokens where the row alone would (its length on), padding past them and never
    visible to a real query; keep moves each row's accepted slots into place; retain drops rows."""
    _, fast = pair
    batch = ragged_prompts(3, seed=5)                 # lengths 5, 8, 11
    cache = fast.new_batch_cache()
    singles = []
    for r, p in enumerate(batch):
        single = fast.new_cache()
        fast.forward(p, single)
        cache.put(r, single)
        singles.append(single)
    assert cache.lengths == [5, 8, 11]
    inputs, parents = [[7], [7, 8, 9], [7, 8]], [None, [-1, -1], None]
    ids, see, positions = cache.verify_inputs(inputs, parents)
    at = cache.cache.layers[0].write_at
    assert ids.shape == (3, 3) and at.tolist() == [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    assert positions.tolist() == [[5, 5, 5], [8, 9, 9], [11, 12, 12]]
    assert see[0, 0].nonzero().flatten().tolist() == list(range(6))            # its 5 slots and itself
    assert see[0, 1].nonzero().flatten().tolist() == [6]                        # a pad: its own slot only
    assert see[1, 2].nonzero().flatten().tolist() == list(range(8)) + [8, 10]   # a tree node: root and itself
    for r in range(3):   # no real query sees a pad's slot
        n = len(inputs[r])
        assert not see[r, :n, cache.lengths[r] + n:].any()
    outs = fast.forward_rows(inputs, cache, parents=parents)
    alone = [fast.forward(x, s, parents=p) for x, s, p in zip(inputs, singles, parents)]
    for o, a in zip(outs, alone):   # up to rounding: attention sums a row by the forward's query count
        torch.testing.assert_close(o.logits, a.logits, rtol=1e-5, atol=1e-5)
    before = cache.cache.layers[0].keys[1, :, 10].clone()
    cache.keep([[0], [0, 2], [0, 1]])
    assert cache.lengths == [6, 10, 13]
    assert torch.equal(cache.cache.layers[0].keys[1, :, 9], before)            # node 2 moved behind the root
    cache.retain([2, 0])
    assert cache.lengths == [13, 6] and cache.cache.layers[0].keys.shape[0] == 2
    with pytest.raises(ValueError, match="slot"):
        cache.put(0, StaticKV(fast.model, 32))


@pytest.mark.parametrize("kernel,dtype", exact_kernels(torch.float32, torch.bfloat16))
def test_a_verify_chain_computes_each_row_as_plain_decoding_does(kernel, dtype):
    """Row-invariant linear layers (draftsmith's rows, oneDNN's) and attention (models/row_attention.py): every row
    of a chain verify of any width (2-40) has the bits of plain decoding's single-token forward at that position — in
    fp32 and in bf16, where a verify used to round apart from plain decoding on near-ties."""
    torch._dynamo.reset()
    target = Target(sticky_target(3.0).model.to(dtype), tokenizer=None, name="tiny-sticky")
    target.compile(64, linear_kernel=kernel)
    assert target.compiled.row_attention and "row-invariant attention" in target.compiled.describe()
    ctx, seq = prompts(1, length=9, seed=5)[0], prompts(1, length=12, seed=6)[0]
    cache = target.new_cache()
    target.forward(ctx, cache, last_only=True)
    singles = [target.forward([t], cache, (1,)) for t in seq]          # plain decoding's forwards
    for width in (2, 3, 4, 5, 9, 12):
        for start in (0, 12 - width):
            target.rollback(cache, len(ctx))
            for t in seq[:start]:                                    # the cache plain decoding had there
                target.forward([t], cache)
            out = target.forward(seq[start:start + width], cache, (1,))
            for j in range(width):
                assert torch.equal(out.logits[j], singles[start + j].logits[0]), (width, start, j)
                assert torch.equal(out.hidden[0][j], singles[start + j].hidden[0][0]), (width, start, j)
    target.rollback(cache, len(ctx))
    wide = target.forward([7] + list(range(11, 50)), cache)
    target.rollback(cache, len(ctx))
    assert torch.equal(wide.logits[0], target.forward([7], cache).logits[0])
    assert target.compiled.fallback is None


def test_tree_slots_put_each_node_at_its_plain_slot_plus_whole_lanes():
    """models/compiled_target.py `tree_slots`: a chain consecutive; a second child (and its subtree) whole LANES
    further than plain decoding would put it, slots increasing along every path; None where it does not fit."""
    lanes, slots = compiled_target.LANES, StaticKV.slots_for(64)
    assert compiled_target.tree_slots([-1, 0, 1], 10, slots) == [10, 11, 12, 13]
    #        node:      0   1   2  3  4  5
    parents = [-1, -1, 1, 0, -1, 2]
    assert compiled_target.tree_slots(parents, 10, slots) == [
        10, 11, 11 + lanes, 12 + lanes, 12, 11 + 2 * lanes, 13 + lanes]
    assert compiled_target.tree_slots(parents, 10, 11 + 2 * lanes + 1) is None        # the last slot is a spare
    block = compiled_target.KEY_BLOCK
    assert compiled_target.tree_slots([-1, -1], block - 8, 2 * block) is None          # a key block further
    assert compiled_target.tree_slots([-1, -1], block - 40, 2 * block) == [block - 40, block - 39, block - 39 + lanes]
    # a move the attention sums apart (models/slot_sums.py): from slot 11 one lane on, the second child's
    assert compiled_target.tree_slots([-1, -1], 10, slots, apart=frozenset({11})) is None
    alike_elsewhere = frozenset({10, 12, 11 + lanes})
    assert compiled_target.tree_slots([-1, -1], 10, slots, alike_elsewhere) == [10, 11, 11 + lanes]
    assert compiled_target.tree_slots([-1, 0], 10, slots, apart=frozenset({11})) == [10, 11, 12]   # a chain never moves


def test_lanes_are_the_cpus_vector_width(monkeypatch):
    """A node moves by the fp32 lanes aten's vectors hold on this CPU: 8 on AVX2 (half the moves across a matrix
    library's block boundary that 16 would make, so fewer nodes left out), 16 on AVX-512 and where not known."""
    for capability, lanes in (("AVX2", 8), ("AVX512", 16), ("DEFAULT", 16)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert compiled_target.vector_lanes() == lanes


def test_the_cache_places_a_tree_spread_where_it_fits_and_packed_where_not():
    """StaticKV.place: a chain and plain decoding consecutive; a tree at `tree_slots`, its pad row after its last
    slot; a tree past the spare slots packed one after another (rows then up to rounding); `keep` reads the slots."""
    cache = StaticKV(sticky_target(3.0).model, 64)
    lanes = compiled_target.LANES
    cache.length = 5
    assert cache.place([-1, 0], pad=0) == [5, 6, 7] and cache.length == 8
    cache.length = 5
    wide = [-1] * 6                                              # six first tokens: lanes 0..5 at depth 1
    assert cache.place(wide, pad=1) == [5] + [6 + lanes * j for j in range(6)]
    assert cache.cache.layers[0].write_at.tolist() == [[5] + [6 + lanes * j for j in range(6)] + [6 + lanes * 5 + 1]]
    for layer in cache.cache.layers:                             # what a prefill's first write does
        layer.lazy_initialization(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    layer = cache.cache.layers[0]
    layer.keys[0, :, 6 + lanes * 3] = 7.0                       # the 4th child's slot
    cache.keep(5, [0, 4])                                        # the root and its 4th child
    assert cache.length == 7 and bool((layer.keys[0, :, 6] == 7.0).all())
    assert cache.slots % lanes == 0                              # whole lanes: no part-lane summed apart
    cache.length = 50                                            # 50 + 1 + 7 lanes is past the cache's slots
    assert cache.place([-1] * 8, pad=0) == list(range(50, 59))


def test_where_a_tree_cannot_be_spread_whole_the_decoder_verifies_the_nodes_that_fit(monkeypatch):
    """Target.placeable: every node but on the compiled CPU target's cache, where a node `tree_slots` cannot place
    (here: across a 512-slot key block, or a move the attention sums apart) is left out with its descendants and the
    rest of its siblings; the decoder verifies what is left, and the output is still plain decoding's."""
    target = sticky_target(3.0)
    tree = [-1, -1, -1, 0, 1, 3]                                            # three first tokens, two grandchildren
    assert target.placeable(tree, target.new_cache()) == list(range(6))     # eager: nothing to gain
    target.compile(600, linear_kernel="mm")
    cache = target.new_cache()
    cache.length = 100
    assert target.placeable(tree, cache) == list(range(6))
    block, lanes = compiled_target.KEY_BLOCK, compiled_target.LANES
    cache.length = block - lanes + 4                                        # depth 1 one lane on: past slot 511
    assert target.placeable(tree, cache) == [0, 3, 5] and target.placeable([-1, 0], cache) == [0, 1]
    cache.length = block - 2 * lanes                                        # two lanes on: past slot 511; one fits
    assert target.placeable(tree, cache) == [0, 1, 3, 4, 5]
    cache.length, cache.apart = 100, frozenset({102})                       # node 4 (depth 2, lane 1) moves apart
    assert target.placeable(tree, cache) == [0, 1, 2, 3, 5]
    cache.placed_anywhere = False                                           # a sliding-window model's layers
    assert target.placeable(tree, cache) == list(range(6))                  # packed, as before

    torch._dynamo.reset()
    fast = compiled("mm")
    verified = []
    forward = fast.forward
    left_out = []

    def first_two_roots(parents, cache):
        kept = [i for i, p in enumerate(parents) if i < 2 and p < 0]
        left_out.append(len(parents) - len(kept))
        return kept

    monkeypatch.setattr(fast, "placeable", first_two_roots)
    monkeypatch.setattr(fast, "forward", lambda ids, cache, *a, parents=None, **kw:
                        verified.append(parents) or forward(ids, cache, *a, parents=parents, **kw))
    ctx = prompts(1, length=8, seed=3)[0]
    proposer = Eagle3Proposer(random_head(fast), fast.model)
    out = speculative_generate(fast, proposer, ctx, k=4, max_new_tokens=12, tree=TreeShape.parse("dynamic:4,3,10"))
    trees = [p for p in verified if p is not None]
    assert len(verified) > 1 and trees and all(p in ([-1, -1], [-1]) for p in trees)   # the first two root children
    assert out.unplaced == sum(left_out) > 0              # the report's unplaced_nodes_per_step counts them
    assert out.tokens == autoregressive_generate(fast, ctx, max_new_tokens=12).tokens


def test_keep_renumbers_the_kept_nodes_of_a_tree():
    step = StepDraft(tokens=[10, 11, 12, 13, 14], parents=[-1, -1, 0, 1, 2], q=torch.arange(5.0)[:, None],
                     conf=[.5, .4, .3, .2, .1], accept=[.9, .8, .7, .6, .5], drafted=5, draft_s=0.0)
    step.keep([0, 1, 2, 4])
    assert (step.tokens, step.parents, step.conf) == ([10, 11, 12, 14], [-1, -1, 0, 2], [.5, .4, .3, .1])
    assert step.q[:, 0].tolist() == [0.0, 1.0, 2.0, 4.0] and step.accept == [.9, .8, .7, .5] and not step.chain
    step.keep([0, 2, 3])
    assert (step.tokens, step.parents) == ([10, 12, 14], [-1, 0, 1]) and step.chain


@pytest.mark.parametrize("kernel,dtype", exact_kernels(torch.float32, torch.bfloat16))
def test_every_row_of_a_tree_verify_is_computed_as_plain_decoding_does(kernel, dtype):
    """A tree's off-chain nodes sit at `tree_slots`: on this tiny target the true path through second and third
    children gets plain decoding's logits bit for bit, fp32 and bf16 (packed one after another, such rows differed: see
    test_packed_tree_rows_differ_which_is_why_trees_are_spread). On SmolLM2 a few such rows still round apart
    (bench/results/cpu-tree-exactness): chains are bit for bit there, trees up to rounding."""
    target, ctx, seq, singles = _plain_rows(dtype, kernel=kernel)
    for start in range(0, 8):
        # root, a wrong first token, a second wrong one, the true one (third child), the true path on from it
        tree = [seq[start], 5, 6, seq[start + 1], seq[start + 2], 8, seq[start + 3], seq[start + 4]]
        parents = [-1, -1, -1, 2, 0, 3, 5]
        out = _tree_rows(target, ctx, seq, start, tree, parents)
        for row, j in ((0, 0), (3, 1), (4, 2), (6, 3), (7, 4)):
            assert torch.equal(out.logits[row], singles[start + j].logits[0]), (dtype, start, row)
            assert torch.equal(out.hidden[0][row], singles[start + j].hidden[0][0]), (dtype, start, row)


@pytest.mark.skipif(not FAST, reason="no row-invariant linear kernel here")
def test_packed_tree_rows_differ_which_is_why_trees_are_spread(monkeypatch):
    """The reason for `tree_slots`, kept measurable: with the nodes packed one after another (the layout before),
    the off-chain rows of these trees differ from plain decoding's (measured: 29 of 32 in fp32, by up to 6e-6; on this
    tiny target bf16's rounding hides them, on SmolLM2 it does not: bench/verify_exactness.py)."""
    monkeypatch.setattr(compiled_target, "tree_slots", lambda parents, past, slots, apart: None)
    target, ctx, seq, singles = _plain_rows(torch.float32)
    differ = 0
    for start in range(0, 8):
        tree = [seq[start], 5, 6, seq[start + 1], seq[start + 2], 8, seq[start + 3], seq[start + 4]]
        out = _tree_rows(target, ctx, seq, start, tree, [-1, -1, -1, 2, 0, 3, 5])
        differ += sum(not torch.equal(out.logits[row], singles[start + j].logits[0])
                      for row, j in ((3, 1), (4, 2), (6, 3), (7, 4)))
    assert differ > 0


@pytest.mark.skipif(not FAST, reason="no row-invariant linear kernel here")
def test_fp32_tree_rows_equal_plain_decoding_across_the_matrix_librarys_key_blocks(monkeypatch):
    """models/slot_sums.py: a 224-slot cache's keys are summed by MKL in two blocks of 112 on the project CPU; a tree
    node moved across the boundary rounds apart from plain decoding's row. With the probed moves the cache refuses
    those trees (the decoder verifies their first chain) and every tree it places gets plain decoding's rows bit for
    bit; without them (the layout before), some placed rows differ."""
    def count(apart_known: bool) -> tuple[int, int, int]:
        if not apart_known:
            monkeypatch.setattr(compiled_target.slot_sums, "for_model", lambda model, slots, lanes: frozenset())
        # a 224-slot cache whatever the lanes (its spare slots are 4 lanes): a smaller one (184 slots with AVX2's 8
        # lanes and max_length 150) is summed in one block, and nothing would be tested
        max_length = 224 - 1 - compiled_target.SPARE_LANES * compiled_target.LANES
        target, ctx, seq, singles = _plain_rows(torch.float32, max_length=max_length, context=80, tokens=40)
        probe = target.new_cache()
        if apart_known and not probe.apart:
            pytest.skip("this machine's matrix library sums a 224-slot cache's keys in one block")
        placed = refused = differ = 0
        for start in range(0, 36):
            probe.length = len(ctx) + start
            if len(target.placeable([-1, -1, 1], probe)) < 3:
                refused += 1
                continue
            out = _tree_rows(target, ctx, seq, start, [seq[start], 5, seq[start + 1], seq[start + 2]], [-1, -1, 1])
            placed += 1
            differ += sum(not torch.equal(out.logits[row], singles[start + j].logits[0]) for row, j in ((2, 1), (3, 2)))
        return placed, refused, differ

    placed, refused, differ = count(apart_known=True)
    assert refused > 0 and placed > refused and differ == 0, (placed, refused, differ)
    placed, refused, differ = count(apart_known=False)
    assert refused == 0 and differ > 0, (placed, refused, differ)


def _plain_rows(dtype, max_length: int = 64, context: int = 9, tokens: int = 12, kernel: str | None = None):
    """A tiny compiled target (a row-invariant linear kernel, FAST's first unless given; row-invariant attention),
    a context, a continuation and plain decoding's single-token forwards over it."""
    torch._dynamo.reset()
    target = Target(sticky_target(3.0).model.to(dtype), tokenizer=None, name="tiny-sticky")
    target.compile(max_length, linear_kernel=kernel or FAST[0])
    ctx, seq = prompts(1, length=context, seed=5)[0], prompts(1, length=tokens, seed=6)[0]
    cache = target.new_cache()
    target.forward(ctx, cache, last_only=True)
    return target, ctx, seq, [target.forward([t], cache, (1,)) for t in seq]


def _tree_rows(target, ctx, seq, start, tree, parents):
    """A tree verify from the cache plain decoding had before seq[start]."""
    cache = target.new_cache()
    target.forward(ctx, cache, last_only=True)
    for t in seq[:start]:
        target.forward([t], cache)
    return target.forward(tree, cache, (1,), parents=parents)


def test_a_second_compile_of_the_same_model_keeps_the_row_invariant_attention():
    """bench/target_cost_curves.py compiles one model once per path: the second compile found the attention installed
    already, took it for not-sdpa and put sdpa back, so the second curve timed sdpa's attention."""
    model = sticky_target(3.0).model
    first = compiled_target.CompiledForward(model, "mm")
    second = compiled_target.CompiledForward(model, "mm")
    assert first.row_attention and second.row_attention
    assert model.config._attn_implementation == row_attention.NAME
    assert "row-invariant attention" in second.describe()
    compiled_target.CompiledForward(model, "mm", row_invariant=False)       # a `-sdpa` path: sdpa again
    assert model.config._attn_implementation == "sdpa"


def test_the_row_invariant_attention_pads_every_query_block_to_four_rows():
    """The contract models/row_attention.py relies on, checked on the kernel itself: with three extra query rows, a
    row's output is the same bits whatever the number of queries (2-64), masks and grouped heads as the target's; a
    single query is transformers' sdpa as it is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q = (torch.randn(1, 4, 64, 16, generator=g) * 4).to(dtype)
        k, v = (torch.randn(2, 1, 2, 80, 16, generator=g) * 4).to(dtype)
        see = torch.ones(64, 80, dtype=torch.bool).tril(16)
        mask = torch.zeros(64, 80, dtype=dtype).masked_fill(~see, torch.finfo(dtype).min)[None, None]
        module = torch.nn.Module()
        module.num_key_value_groups, module.is_causal, module.training = 2, True, False
        one, _ = row_attention.row_invariant_sdpa(module, q[:, :, :1], k, v, mask[:, :, :1], scaling=0.25)
        assert torch.equal(one, sdpa_attention_forward(module, q[:, :, :1], k, v, mask[:, :, :1], scaling=0.25)[0])
        first = None
        for n in (2, 3, 4, 5, 31, 32, 33, 35, 64):
            out, _ = row_attention.row_invariant_sdpa(module, q[:, :, :n], k, v, mask[:, :, :n], scaling=0.25)
            assert out.shape == (1, n, 4, 16)
            first = out[:, :1] if first is None else first
            assert torch.equal(out[:, :1], first), (dtype, n)
            if n == 33:
                row32 = out[:, 32]                                    # a row of the second block of 32 queries
            elif n > 33:
                assert torch.equal(out[:, 32], row32), (dtype, n)


@pytest.mark.skipif(not exact_kernels(torch.bfloat16), reason="no row-invariant bf16 linear kernel here")
def test_a_reduced_precision_target_runs_batched_steps_two_tokens_wide():
    """bf16 with a row-invariant kernel: a batched step of single tokens runs two tokens wide (models/static_rows.py
    `row_width`: its rows then round as batch 1's two-row single tokens do); fp32 keeps one token a row."""
    ctx = prompts(1, length=9, seed=5)[0]
    kernel = exact_kernels(torch.bfloat16)[0].values[0]
    for dtype, width in ((torch.bfloat16, 2), (torch.float32, 1)):
        target = Target(sticky_target(3.0).model.to(dtype), tokenizer=None, name="tiny-sticky")
        target.compile(64, linear_kernel=kernel)
        rows = target.new_batch_cache()
        for r in range(3):
            alone = target.new_cache()
            target.forward(ctx, alone, last_only=True)
            rows.put(r, alone)
        ids, see, _ = rows.verify_inputs([[7], [8], [9]], [None] * 3)
        assert ids.shape == (3, width), dtype
        assert see[:, 0].sum(-1).tolist() == [len(ctx) + 1] * 3     # the real token sees its row and itself
        ids, _, _ = rows.verify_inputs([[7, 1, 2], [8], [9]], [None] * 3)
        assert ids.shape == (3, 3), dtype


@pytest.mark.skipif(not FAST, reason="no row-invariant linear kernel here")
def test_verify_exactness_counts_chain_rows_and_each_off_chain_child():
    """bench/verify_exactness.py's count: every chain row (w = 2..9) and root, and the rows through the 2nd, 3rd and 4th
    child of each tree, at each position; on this tiny target none differs from plain decoding."""
    from draftsmith.bench import verify_exactness
    torch._dynamo.reset()
    target = sticky_target(3.0)
    target.compile(64, linear_kernel=FAST[0])
    positions = 3
    found = verify_exactness.count(target, prompts(1, length=9, seed=5)[0], max(verify_exactness.CHAINS) + positions)
    siblings = verify_exactness.SIBLINGS
    assert found["chain_rows"] == positions * (sum(verify_exactness.CHAINS) + len(siblings))
    for r in siblings:
        assert found[f"child{r + 1}_rows"] == positions * 2
    assert all(v == 0 for k, v in found.items() if not k.endswith("_rows")), found
