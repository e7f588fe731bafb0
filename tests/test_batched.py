"""Batched decoding (eval/batched.py, models/batch_cache.py): every row decodes as it would alone.

Greedy outputs at every batch size equal the batch-1 outputs for chain, tree and block drafters, with prompts
of different lengths, rows finishing at different steps (EOS, the token budget, a first-token EOS that never
takes a row) and waiting prompts joining freed rows; sampling with each prompt's own generator draws the same
tokens as the single-sequence run of that prompt (so the per-row law is the single-sequence one, whose exactness
tests/test_verify.py proves); the ragged cache's logits match single-row forwards."""

import copy
import json

import pytest
import torch

from draftsmith.cli import main
from draftsmith.eval.batched import BatchTiming, batched_generate, common_width
from draftsmith.eval.decoder import NoDraft, StepDraft, autoregressive_generate, speculative_generate
from draftsmith.eval.draft_length import CostCurve, DraftGate, DraftLengthRule, measure_cost_curve
from draftsmith.models.batch_cache import RaggedCache
from draftsmith.models.block_drafter import BlockProposer
from draftsmith.models.composite import CompositeProposer
from draftsmith.models.dspark import DSparkHead
from draftsmith.models.eagle3 import Eagle3Proposer
from draftsmith.models.parallel import ParallelProposer
from draftsmith.models.peagle import PEagleProposer
from draftsmith.models.prompt_lookup import PromptLookupProposer
from draftsmith.models.small_lm import SmallLMProposer
from draftsmith.models.target import Target
from draftsmith.protocol.drafting import TreeShape
from draftsmith.protocol.proposer import fork
from draftsmith.protocol.sampling import Sampling

from conftest import noisy_copy, prompts, tiny_llama
from test_block_drafter import block_head
from test_cli import tiny_folders  # noqa: F401  (tiny saved target and drafter, a two-prompt bench)
from test_eagle3 import random_head
from test_parallel import parallel_model
from test_peagle import peagle_head

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


@pytest.fixture(scope="module")
def target4():
    """A tiny 4-layer target leaning towards one token (test_block_drafter.py's sticky target, less sticky): its
    greedy text mixes that token with others, so random heads accept some drafts and reject others."""
    return sticky_target(3.0)


def sticky_target(boost: float) -> Target:
    model = tiny_llama(0, layers=4)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1
        model.lm_head.weight[5, 0] = boost
    return Target(model, tokenizer=None, name=f"tiny-sticky-{boost}")


def ragged_prompts(n: int = 6, seed: int = 2) -> list[list[int]]:
    """Prompts of lengths 5, 8, 11, ...: every row sits at its own length."""
    return [p[: 5 + 3 * i] for i, p in enumerate(prompts(n, length=5 + 3 * n, seed=seed))]


DRAFTERS = {   # name: (proposer for a target, tree, how sticky a target gives mixed acceptance)
    "small_lm-chain": (lambda t: SmallLMProposer(noisy_copy(t.model)), None, 3.0),
    "eagle3-chain": (lambda t: Eagle3Proposer(random_head(t), t.model), None, 3.0),
    "eagle3-tree": (lambda t: Eagle3Proposer(random_head(t), t.model), "dynamic:4,3,10", 3.0),
    "dspark-block": (lambda t: BlockProposer(block_head(DSparkHead, t), t.model), None, 6.0),
    "dspark-tree": (lambda t: BlockProposer(block_head(DSparkHead, t), t.model), "dynamic:4,2,8", 6.0),
    "lookup+eagle3": (lambda t: CompositeProposer([PromptLookupProposer(), Eagle3Proposer(random_head(t), t.model)]),
                      "dynamic:3,2,6", 3.0),
    "peagle-chain": (lambda t: PEagleProposer(peagle_head(t), t.model), None, 6.0),
    "small_lm-tree": (lambda t: SmallLMProposer(noisy_copy(t.model)), "dynamic:3,2,5", 3.0),
    "parallel-chain": (lambda t: ParallelProposer(parallel_model(t, scale=0.3)), None, 3.0),
    "parallel-tree": (lambda t: ParallelProposer(parallel_model(t, scale=0.3)), "dynamic:3,2,5", 3.0),
}


def two_eos(plain) -> tuple[int, int]:
    """EOS tokens that end one prompt at its first token (it never takes a row) and another mid-run."""
    firsts = [r.tokens[0] for r in plain]
    alone = next(f for f in firsts if firsts.count(f) == 1)
    mid = next(t for r in plain if r.tokens[0] != alone for t in r.tokens[3:] if t not in firsts)
    return alone, mid


def decoded_alone(target: Target, name: str):
    """DRAFTERS[name] on `target`, ragged prompts with two EOS tokens, and each prompt decoded alone (batch 1):
    (proposer, tree, prompts, plain results, eos, speculative results)."""
    make, spec, _ = DRAFTERS[name]
    proposer, tree = make(target), TreeShape.parse(spec)
    batch = ragged_prompts()
    plain = [autoregressive_generate(target, p, max_new_tokens=20) for p in batch]
    eos = two_eos(plain)
    single = [speculative_generate(target, proposer, p, k=4, tree=tree, max_new_tokens=20, eos_token_ids=eos)
              for p in batch]
    ends = {len(r.tokens) for r in single}
    assert len(ends) > 2 and min(ends) == 1, ends     # rows finish at different steps, one at its first token
    return proposer, tree, batch, plain, eos, single


def assert_rows_decode_alone(target, proposer, tree, batch, eos, single, size) -> None:
    """Batched greedy decoding at `size` gives every prompt the tokens, drafts and acceptances of its `single`
    (batch-1) run, in fewer steps; 5 of the prompts take a row (one ends at its first token)."""
    timing = BatchTiming()
    rows = batched_generate(target, proposer, batch, batch_size=size, k=4, tree=tree, max_new_tokens=20,
                            eos_token_ids=eos, timing=timing)
    assert [r.tokens for r in rows] == [r.tokens for r in single], size
    # drafts depend on the row's own state only: the same drafts, accepted the same, step by step
    assert [r.accepted for r in rows] == [r.accepted for r in single], size
    assert [r.proposed for r in rows] == [r.proposed for r in single], size
    assert max(timing.rows) == min(size, 5) and timing.steps < sum(r.steps for r in single)


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_batched_greedy_equals_batch_one_per_row(name):
    target = sticky_target(DRAFTERS[name][2])
    proposer, tree, batch, plain, eos, single = decoded_alone(target, name)
    for size in (2, 4, 6):                            # 6 prompts: joins at 2 and 4
        assert_rows_decode_alone(target, proposer, tree, batch, eos, single, size)
    accepted = [a for r in single for a in r.accepted]
    proposed = [p for r in single for p in r.proposed]
    assert 0 < sum(accepted) < sum(proposed)          # partial acceptance: rows roll back by different amounts


def test_batched_plain_decoding_equals_plain_decoding(target4):
    batch = ragged_prompts(5, seed=7)
    plain = [autoregressive_generate(target4, p, max_new_tokens=16).tokens for p in batch]
    for size in (1, 3, 5):
        rows = batched_generate(target4, NoDraft(), batch, batch_size=size, k=0, max_new_tokens=16)
        assert [r.tokens for r in rows] == plain
        assert all(r.proposed == [0] * r.steps for r in rows)


@pytest.mark.parametrize("name", ["eagle3-chain", "dspark-tree"])
def test_batched_sampling_draws_what_each_row_draws_alone(target4, name):
    make, spec, _ = DRAFTERS[name]
    proposer, tree = make(target4), TreeShape.parse(spec)
    sampling = Sampling(temperature=1.0)
    batch = ragged_prompts(5, seed=11)
    single = [speculative_generate(target4, proposer, p, k=3, tree=tree, max_new_tokens=16, sampling=sampling,
                                   generator=torch.Generator().manual_seed(100 + i)).tokens
              for i, p in enumerate(batch)]
    rows = batched_generate(target4, proposer, batch, batch_size=3, k=3, tree=tree, max_new_tokens=16,
                            sampling=sampling, generators=[torch.Generator().manual_seed(100 + i)
                                                           for i in range(len(batch))])
    assert [r.tokens for r in rows] == single
    assert len({tuple(t) for t in single}) == len(single)


def test_k_auto_with_a_batch_stays_lossless_and_measures_the_batched_curve(target4):
    proposer = Eagle3Proposer(random_head(target4), target4.model)
    batch = ragged_prompts(5, seed=3)
    plain = [autoregressive_generate(target4, p, max_new_tokens=20).tokens for p in batch]
    curve = measure_cost_curve(target4, sizes=(1, 2, 4, 8), context=16, reps=2, rows=4)
    assert curve.sizes == [1, 2, 4, 8] and all(s > 0 for s in curve.seconds)
    assert curve.seconds == sorted(curve.seconds)
    rule = DraftLengthRule(CostCurve([1, 2, 4, 8], [0.010, 0.011, 0.013, 0.020]))
    rows = batched_generate(target4, proposer, batch, batch_size=4, k=6, max_new_tokens=20, rule=rule,
                            draft_gate=False)       # every step drafts (the gate's own tests are below)
    assert [r.tokens for r in rows] == plain
    assert sum(rule.chosen) > 0 and len(rule.chosen) == sum(r.steps for r in rows)


def test_the_gate_stops_drafting_only_where_drafting_measurably_loses_and_probes_every_eighth_step():
    gate = DraftGate(ema=0.5, least=2)
    assert gate.drafts()                                            # nothing measured: the first step drafts
    gate.record(True, 24, 4, 0.05)                                  # 6 tokens a row in 50 ms: 120 a row per second
    assert gate.rate(True) == pytest.approx(120.0) and not gate.drafts()   # the second measures plain decoding
    gate.record(False, 4, 4, 0.01)                                  # 1 a row in 10 ms: 100
    assert gate.rate(False) == pytest.approx(100.0) and gate.drafts()
    gate.record(True, 4, 4, 0.05)        # means of tokens a row and of seconds: 3.5 / 0.05 = 70 < 100, but the
    assert gate.rate(True) == pytest.approx(70.0)                   # two steps' rates (120, 20) spread widely:
    assert gate.rate(True) + 2 * gate.error(True) > 100 and gate.drafts()   # not a measured loss
    for _ in range(4):
        gate.record(True, 8, 4, 0.05)                               # steady: 2 a row in 50 ms, 40 a row per second
    assert gate.rate(True) + 2 * gate.error(True) < 100 and not gate.drafts()   # now drafting loses: plain steps
    decisions = []
    for _ in range(8):
        drafted = gate.drafts()
        decisions.append(drafted)
        if not drafted:
            gate.record(False, 2, 2, 0.0125)                        # a draining batch: 2 rows, 1 a row in 12.5 ms
    assert decisions == [False] * 7 + [True]                        # the 8th step measures drafting again
    assert gate.rate(False) == pytest.approx(80.0, rel=0.01)        # per row: the 2-row steps count as such
    # the probe's observe caught up on 8 steps: it counts as one step's share (1/8 of its seconds)
    before = list(gate.means[True])
    gate.record(True, 40, 4, 0.11, observe_s=0.08)                  # 10 a row in 0.11 - 0.07 = 0.04 s
    assert gate.means[True][:2] == pytest.approx([before[0] + 0.5 * (10 - before[0]),
                                                  before[1] + 0.5 * (0.04 - before[1])])
    assert gate.since_draft == 0


class _ScriptedGate:
    """Drafts at the steps a pattern says (a stand-in for DraftGate, whose choices follow wall-clock time)."""

    def __init__(self, pattern):
        self.pattern, self.step = pattern, 0

    def __call__(self):
        return self

    def drafts(self) -> bool:
        self.step += 1
        return self.pattern(self.step - 1)

    def record(self, *args, **kwargs) -> None:
        pass


@pytest.mark.parametrize("make", [lambda t: Eagle3Proposer(random_head(t), t.model),
                                  lambda t: BlockProposer(block_head(DSparkHead, t), t.model),
                                  lambda t: PEagleProposer(peagle_head(t), t.model)],
                         ids=["eagle3", "dspark", "peagle"])
def test_steps_without_drafts_skip_the_proposers_which_then_observe_every_position_since(target4, monkeypatch, make):
    """Steps 1, 2, 4, 5, 7, ... run without drafts: no drafter forward, nothing proposed, and the next drafting
    step's observe shows each row every position kept since it last looked (hidden states of all of them, in
    order: each observe starts where the last ended). Outputs stay plain decoding's; joins and EOS as usual."""
    import draftsmith.eval.batched as batched_module

    gate = _ScriptedGate(lambda step: step % 3 == 0)
    monkeypatch.setattr(batched_module, "DraftGate", gate)
    seen, real = {}, batched_module.observe_all

    def record(proposers, states):
        for p, s in zip(proposers, states):
            assert all(h.shape[0] == s.committed - s.hidden_start for h in s.hidden)
            seen.setdefault(id(p), []).append((s.hidden_start, s.committed))
        real(proposers, states)

    monkeypatch.setattr(batched_module, "observe_all", record)
    proposer = make(target4)
    batch = ragged_prompts(6, seed=6)
    plain = [autoregressive_generate(target4, p, max_new_tokens=24).tokens for p in batch]
    rule = DraftLengthRule(CostCurve([1, 2, 4, 8], [0.010, 0.0101, 0.0102, 0.0103]))   # drafts pay
    timing = BatchTiming()
    rows = batched_generate(target4, proposer, batch, batch_size=4, k=4, max_new_tokens=24, rule=rule, timing=timing)
    assert [r.tokens for r in rows] == plain
    assert timing.undrafted_steps == sum(1 for step in range(timing.steps) if step % 3) > 0
    proposed = [n for r in rows for n in r.proposed]
    assert sum(n == 0 for n in proposed) >= timing.undrafted_steps and sum(proposed) > 0
    assert len(rule.chosen) == sum(n for step, n in enumerate(timing.rows) if step % 3 == 0)   # drafting rows only
    assert seen and all(spans[i][0] == spans[i - 1][1] for spans in seen.values() for i in range(1, len(spans)))
    # one observe per row per drafting step (about a third of the row-steps), each catching up on the steps since
    assert sum(len(spans) for spans in seen.values()) <= sum(timing.rows) // 2


def test_k_auto_at_a_batch_measures_drafting_then_plain_steps_and_stays_lossless(target4):
    """With the real gate: the first step drafts, the second runs without drafts (both rates measured), outputs
    are plain decoding's whatever the gate chooses after."""
    proposer = CompositeProposer([PromptLookupProposer(), Eagle3Proposer(random_head(target4), target4.model)])
    batch = ragged_prompts(5, seed=7)
    plain = [autoregressive_generate(target4, p, max_new_tokens=30).tokens for p in batch]
    timing = BatchTiming()
    rule = DraftLengthRule(CostCurve([1, 2, 4], [0.010, 0.0101, 0.0102]))     # drafts pay, by the curve
    rows = batched_generate(target4, proposer, batch, batch_size=4, k=4, max_new_tokens=30, rule=rule, timing=timing)
    assert [r.tokens for r in rows] == plain
    assert all(r.proposed[0] > 0 and r.proposed[1] == 0 for r in rows[:4]) and timing.undrafted_steps >= 1


@pytest.mark.parametrize("seconds,width", [([0.010, 0.011, 0.030, 0.031, 0.032], 2),   # steep past 2 tokens
                                           ([0.010] * 5, 5)])                          # flat: the sure row's 4
def test_a_batched_step_verifies_the_width_that_pays_for_the_whole_batch(seconds, width):
    """A sure row (predicted acceptance 0.95 a node) and an unsure one (0.05): the step's width maximises the
    batch's expected tokens per cost, e.g. steep: (1.95 + 1.05) / 0.011 at width 2 beats 5.58 / 0.032 at 5."""
    rule = DraftLengthRule(CostCurve([1, 2, 3, 4, 5], seconds))
    sure = StepDraft([1, 2, 3, 4], [-1, 0, 1, 2], None, [0.99] * 4, [0.95] * 4, 4, 0.0)
    unsure = StepDraft([5], [-1], None, [0.05], [0.05], 1, 0.0)
    assert common_width(rule, [sure, unsure]) == width
    sure.cut(width - 1)
    assert sure.tokens == [1, 2, 3, 4][: width - 1] and sure.parents == [-1, 0, 1, 2][: width - 1]
    assert len(sure.conf) == len(sure.accept) == width - 1


def test_ragged_forward_matches_each_row_alone_and_keep_compacts(target4):
    """Rows at lengths 4, 9 and 6 verify a chain, a tree and a lone root in one forward; logits and taps match
    single-row forwards, and after `keep` each row's cache equals the single-row cache that kept the same."""
    t, layers = target4, (0, -1)
    ctx = prompts(3, length=9, seed=5)
    ctx = [ctx[0][:4], ctx[1], ctx[2][:6]]
    inputs = [[11, 12, 13, 14], [21, 22, 23, 24, 25], [31]]
    parents = [None, [-1, -1, 0, 1], None]
    kept = [[0, 1, 2], [0, 2, 3], [0]]
    ragged, singles = RaggedCache(), []
    for r, c in enumerate(ctx):
        cache = t.new_cache()
        t.forward(c, cache)
        singles.append(cache)
        ragged.put(r, copy.deepcopy(cache))
    outs = t.forward_rows(inputs, ragged, layers, parents)
    for r in range(3):
        alone = t.forward(inputs[r], singles[r], layers, parents=parents[r])
        torch.testing.assert_close(outs[r].logits, alone.logits, rtol=1e-5, atol=1e-5)
        for a, b in zip(outs[r].hidden, alone.hidden):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        t.keep(singles[r], len(ctx[r]), kept[r])
    ragged.keep(kept)
    assert ragged.lengths == [len(c) + len(k) for c, k in zip(ctx, kept)]
    assert ragged.physical == max(ragged.lengths)
    for r in range(3):
        for layer, alone in zip(ragged.cache.layers, singles[r].layers):
            n = ragged.lengths[r]
            torch.testing.assert_close(layer.keys[r, :, :n], alone.keys[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.values[r, :, :n], alone.values[0], rtol=1e-5, atol=1e-5)
    # a row leaves; the others keep their slots and lengths
    before = [layer.keys[2, :, :ragged.lengths[2]].clone() for layer in ragged.cache.layers]
    ragged.retain([0, 2])
    assert ragged.lengths == [len(ctx[0]) + 3, len(ctx[2]) + 1] and ragged.rows == 2
    for layer, b in zip(ragged.cache.layers, before):
        torch.testing.assert_close(layer.keys[1, :, :b.shape[1]], b)


def test_fork_gives_each_row_its_own_state(target4):
    composite = CompositeProposer([PromptLookupProposer(), Eagle3Proposer(random_head(target4), target4.model)])
    other = fork(composite)
    assert other is not composite and other.members[1] is not composite.members[1]
    assert other.members[1].head is composite.members[1].head          # the weights are shared
    speculative_generate(target4, composite, prompts(1)[0], k=3, max_new_tokens=6)
    assert other.members[1].length == 0                                # the fork's cache stayed empty


def test_eval_batch_sizes_table_and_outputs(tiny_folders, tmp_path):  # noqa: F811
    out = tmp_path / "report"
    rc = main(["eval", "--target", str(tiny_folders / "target"), "--drafter", str(tiny_folders / "drafter"),
               "--bench", str(tiny_folders / "bench.jsonl"), "--turns", "2", "--max-new-tokens", "10", "--k", "auto",
               "--batch-size", "1,2", "--device", "cpu", "--no-hf-assisted", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["batch_size"] for r in report["batched"]] == [1, 2]
    row = report["batched"][1]
    assert row["lossless_match_rate"] == 1.0 and row["plain_match_rate"] == 1.0
    assert row["divergences_not_near_tie"] == 0 and row["plain_tokens_per_s"] > 0 and row["speedup"] > 0
    assert row["sd_time_split"]["steps"] > 0 and row["draft_length"]["cost_curve_per_row"]["tokens"]
    assert [(o["id"], o["turn"]) for o in report["outputs"]] == [("geo", 1), ("geo", 2)]   # --turns 2: geo only
    assert [o["plain"] for o in report["outputs"]] == row["outputs"]["plain"]
    assert all(o["speculative"] == o["plain"] for o in report["outputs"])
    md = (out / "report.md").read_text()
    assert "## Batch sizes" in md
    split = row["sd_time_split"]       # --k auto: the gate's steps without drafts, in the json and the table
    assert 1 <= split["undrafted_steps"] < split["steps"]      # its second step never drafts, its first does
    assert f"| 2 | {split['steps']} | {split['undrafted_steps']} | " in md


@pytest.mark.parametrize("value", ["0", "1,x", ""])
def test_bad_batch_size_is_a_clear_error(tiny_folders, tmp_path, capsys, value):  # noqa: F811
    with pytest.raises(SystemExit):
        main(["eval", "--target", str(tiny_folders / "target"), "--drafter", "prompt-lookup", "--bench",
              str(tiny_folders / "bench.jsonl"), "--batch-size", value, "--out", str(tmp_path / "o")])
    assert "--batch-size takes positive integers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sigterm_during_the_batched_passes_keeps_the_report_with_the_sizes_done(  # noqa: F811
        tiny_folders, tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM while batch size 4 runs: exit 130, the batch-1 pass and size 2 reported, the
    eval's handler removed again."""
    import os
    import signal

    from draftsmith.eval import harness

    real = harness.batch_row

    def stop_at_four(runner, size, *args, **kwargs):
        if size == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(runner, size, *args, **kwargs)

    monkeypatch.setattr(harness, "batch_row", stop_at_four)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "report"
    rc = main(["eval", "--target", str(tiny_folders / "target"), "--drafter", "prompt-lookup",
               "--bench", str(tiny_folders / "bench.jsonl"), "--max-new-tokens", "6", "--batch-size", "1,2,4",
               "--device", "cpu", "--no-hf-assisted", "--out", str(out)])
    assert rc == 130 and signal.getsignal(signal.SIGTERM) == before
    assert "and batch sizes 1, 2 of 1, 2, 4; the report covers those" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [r["batch_size"] for r in report["batched"]] == [1, 2]
    assert report["interrupted"]["batch_sizes_done"] == [1, 2] and report["lossless_match_rate"] == 1.0
    assert "prompts and batch sizes 1, 2 of 1, 2, 4 ran" in (out / "report.md").read_text()


def test_drafters_draft_and_observe_all_rows_in_one_forward(target4):
    """propose_rows / observe_rows: one head forward per drafting round and per observe for the whole batch
    (a composite passes its head member the rows together; P-EAGLE and the block drafters one forward a step), and
    the same tokens and drafts as batch 1."""
    for proposer, rounds in ((Eagle3Proposer(random_head(target4), target4.model), 3),
                             (CompositeProposer([PromptLookupProposer(), Eagle3Proposer(random_head(target4), target4.model)]), 3),
                             (PEagleProposer(peagle_head(target4), target4.model), 1),
                             (BlockProposer(block_head(DSparkHead, target4), target4.model), 1),
                             (SmallLMProposer(noisy_copy(target4.model)), 3),
                             (ParallelProposer(parallel_model(target4, scale=0.3)), 1)):
        head = next(getattr(p, a) for p in (proposer, *getattr(proposer, "members", [])[1:])
                    for a in ("head", "model") if hasattr(p, a))
        calls = []
        head.register_forward_hook(lambda *_: calls.append(1))
        batch = ragged_prompts(4, seed=5)
        single = [speculative_generate(target4, proposer, p, k=3, max_new_tokens=12) for p in batch]
        alone = len(calls)
        calls.clear()
        timing = BatchTiming()
        rows = batched_generate(target4, proposer, batch, batch_size=4, k=3, max_new_tokens=12, timing=timing)
        assert [r.tokens for r in rows] == [r.tokens for r in single]
        assert [r.proposed for r in rows] == [r.proposed for r in single]
        # per batched step: k - 1 = 2 drafting rounds and one observe (EAGLE-3), or one forward drafting the
        # block (P-EAGLE, whose observe only keeps the rows; DSpark, whose observe projects the context outside
        # its forward; PARD); a small LM feeds what its cache lacks, then k - 1 = 2 rounds; one prefill observe
        # per prompt
        assert len(calls) <= rounds * timing.steps + len(batch) < alone


def test_lm_rows_compute_each_row_as_alone(target4):
    """models/lm_rows.py: transformers-LM drafter rows at cache lengths 0, 9, 6 and 4 feeding 2 tokens, 1 token,
    3 tree nodes (own mask and positions) and a 20-token prompt (run alone) in one call: each row's logits of its
    last `keep` positions and its extended cache equal a forward of that row alone."""
    from draftsmith.models.lm_rows import LMFeed, forward_rows
    from draftsmith.models.target import cache_kwarg, new_cache

    model = noisy_copy(target4.model)
    history = prompts(4, length=9, seed=4)
    tree_see = torch.zeros(3, 6 + 3, dtype=torch.bool)
    tree_see[:, :6] = True
    tree_see[0, 6] = tree_see[1, [6, 7]] = tree_see[2, [6, 8]] = True       # node 0; 1 and 2 its children
    feeds = [LMFeed([3, 4]), LMFeed([7]), LMFeed([1, 2, 5], tree_see, [6, 7, 7]), LMFeed(list(range(1, 21)))]
    lengths = [0, 9, 6, 4]

    def caches():
        out = []
        for h, n in zip(history, lengths):
            cache = new_cache(model)
            if n:
                model(input_ids=torch.tensor([h[:n]]), use_cache=True, **{cache_kwarg(model): cache})
            out.append(cache)
        return out

    together, alone = caches(), caches()
    got = forward_rows(model, together, feeds, keep=3)
    for r, feed in enumerate(feeds):
        want = forward_rows(model, [alone[r]], [feed], keep=3)[0]
        assert got[r].shape == want.shape == (min(3, len(feed.tokens)), model.config.vocab_size)
        torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)
        assert together[r].get_seq_length() == lengths[r] + len(feed.tokens)
        for mine, theirs in zip(together[r].layers, alone[r].layers):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)


def test_packed_rows_attend_as_each_row_alone():
    """models/row_batch.py: rows at different cache lengths with different new-row counts and tree masks,
    through one Attention call, give each row's own output and cache."""
    from draftsmith.models.layers import Attention, LayerShape
    from draftsmith.models.row_batch import Feed, pack, unpack
    torch.manual_seed(0)
    shape = LayerShape(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=50)
    attn = Attention(shape).eval()
    caches, feeds, alone = [], [], []
    for length, new, tree in ((5, 1, False), (9, 3, False), (2, 4, True)):
        history = torch.randn(1, length, 32)
        cache: list = []
        attn(history, torch.arange(length)[None], cache, None)       # prefill the row's own cache
        x = torch.randn(new, 32)
        mask = None
        positions = None
        if tree:      # two branches off the context: node 0 <- 1, node 2 <- 3
            mask = torch.zeros(new, length + new, dtype=torch.bool)
            mask[:, :length] = True
            for i, sees in enumerate(([0], [0, 1], [2], [2, 3])):
                mask[i, [length + s for s in sees]] = True
            positions = [length, length + 1, length, length + 1]
        own = [t.clone() for t in cache]
        pos = torch.tensor([positions if positions is not None else list(range(length, length + new))])
        full = (torch.ones(new, length + new, dtype=torch.bool).tril(length) if mask is None else mask)
        alone.append((attn(x[None], pos, own, full)[0], own))
        caches.append(cache)
        feeds.append(Feed(x, [0] * new, length, positions, mask))
    packed = pack(caches, feeds)
    out = attn(packed.hidden, packed.positions, packed.cache, packed.mask)
    for r, (y, own) in enumerate(alone):
        torch.testing.assert_close(out[r, : len(y)], y, atol=1e-6, rtol=1e-5)
        for mine, theirs in zip(unpack(packed, caches)[r], own):
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)
