"""Kinds `dflash` and `dspark` (block drafters, models/block_drafter.py): lossless in the built-in decoder
(chains, dynamic and static trees) with ONE drafter forward per verify step, never more drafts than a
block holds; the exact sampling law per step with dspark's Markov bias; the training layout = what
drafting sees, across observe() calls and a rollback; training lowers the loss with the LM head frozen,
under every position-weight option; dspark's confidence head (Draft.accept, the `--k auto` rule,
GenerationResult.predicted, the eval report's reliability table); draftsmith's own folder round trip;
and train -> resume -> export -> eval through the CLI."""

import json
import shutil

import pytest
import torch

from draftsmith.bench.decode_profile import count_drafter_forwards
from draftsmith.distill.objective import POSITION_WEIGHTS, Objective
from draftsmith.errors import DraftsmithError
from draftsmith.eval.decoder import _reached, autoregressive_generate, make_sampler, speculative_generate
from draftsmith.eval.draft_length import Calibration, CostCurve, DraftLengthRule
from draftsmith.eval.harness import acceptance_source
from draftsmith.eval.metrics import PromptRecord, reliability_by_position, summarize
from draftsmith.models import load_drafter
from draftsmith.models.block_drafter import BlockProposer, BlockTrainModule, build_block_head
from draftsmith.models.dflash import DFlashHead
from draftsmith.models.dspark import DSparkHead
from draftsmith.models.formats import read_head_folder
from draftsmith.models.layers import default_aux_layers, target_parts
from draftsmith.models.target import Target, target_signals
from draftsmith.protocol.drafting import DraftSampler, TreeShape
from draftsmith.protocol.proposer import DecodeState
from draftsmith.protocol.sampling import Sampling, warp
from draftsmith.protocol.tree import depths

from conftest import VOCAB, perturbed, prompts, tiny_llama
from test_parallel import setup  # noqa: F401  (the tiny saved target, chats and recipe)
from test_training import assert_same_checkpoint, ckpt_path
from test_verify import law_of_verify_sampling

MASK = 7
BLOCK = 5          # dflash drafts 4 per forward, dspark 5
STICKY = 5
KINDS = pytest.mark.parametrize("cls", [DFlashHead, DSparkHead], ids=["dflash", "dspark"])

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


@pytest.fixture(scope="module")
def target4() -> Target:
    """A tiny 4-layer target that favours one token (STICKY) everywhere: a constant coordinate in every
    embedding, read by STICKY's LM-head row. Its greedy text falls into runs of STICKY that an untrained
    block drafter drafts too, so steps accept anything from 0 to k drafts (a random target accepts none)."""
    model = tiny_llama(0, layers=4)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1
        model.lm_head.weight[STICKY, 0] = 12.0
    return Target(model, tokenizer=None, name="tiny-target-4")


def assert_mixed(accepted: list[int], proposed: list[int]) -> None:
    """Some drafts were accepted and some rejected: the test exercised both."""
    assert 0 < sum(accepted) < sum(proposed), (accepted, proposed)


def block_head(cls, target, seed=0, draft_vocab=160, **extra):
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
    if cls is DSparkHead:
        extra.setdefault("markov_rank", 32)
    head = build_block_head(cls, target.model, default_aux_layers(target.num_layers), ids, MASK, 2, BLOCK, **extra)
    return perturbed(head, seed).eval()


def observed(proposer, target, prompt):
    """The proposer after the prefill of `prompt` (its last token the newest, not yet read), and that state."""
    proposer.reset()
    out = target.forward(prompt[:-1], target.new_cache(), proposer.hidden_layers)
    state = DecodeState(tokens=list(prompt), committed=len(prompt) - 1, hidden=out.hidden, hidden_start=0)
    proposer.observe(state)
    return state


@torch.no_grad()
def fresh_block(head, target, tokens):
    """The block's hidden states [block, H] from scratch: context = the target's taps over tokens[:-1] at their
    positions, anchor = tokens[-1]."""
    c, n = head.config, len(tokens) - 1
    out = target.forward(tokens[:-1], target.new_cache(), tuple(c.aux_layers))
    kv = head.context(head.fuse(out.hidden)[None], torch.arange(n)[None])
    ids = torch.tensor([[tokens[-1]] + [MASK] * (c.block_size - 1)])
    return head(target_parts(target.model)[0](ids), torch.arange(n, n + c.block_size)[None], kv)[0]


@torch.no_grad()
def fresh_logits(head, hidden, i, prev):
    """Draft i's logits [V] (-inf outside the draft vocabulary) after previous token `prev` (the Markov bias)."""
    h = hidden[head.config.offset + i]
    logits = head.logits(h).float()
    bias = head.bias(torch.tensor(prev), h)
    full = torch.full((VOCAB,), float("-inf"))
    full[head.draft_ids] = logits if bias is None else logits + bias.float()
    return full


@torch.no_grad()
def fresh_accept(head, hidden, depth, prev) -> float:
    return float(torch.sigmoid(head.confidence(torch.tensor([prev]), hidden[head.config.offset + depth - 1][None]))[0])


# ------------------------------------------------------------------------------------ decoding

@KINDS
@pytest.mark.parametrize("k", [1, 4, 7])
def test_greedy_equality_with_one_drafter_forward_per_step(target4, cls, k):
    head = block_head(cls, target4)
    proposer = BlockProposer(head, target4.model)
    forwards = count_drafter_forwards(proposer, target4)       # what bench/decode_profile.py reports
    accepted, proposed = [], []
    for prompt in prompts(4, seed=4):
        ar = autoregressive_generate(target4, prompt, max_new_tokens=24)
        before = forwards[0]
        sd = speculative_generate(target4, proposer, prompt, k=k, max_new_tokens=24)
        assert sd.tokens == ar.tokens
        assert forwards[0] - before == sum(1 for n in sd.proposed if n > 0)
        assert max(sd.proposed) == min(k, BLOCK - head.config.offset)   # a block's drafts at most
        accepted, proposed = accepted + sd.accepted, proposed + sd.proposed
    assert_mixed(accepted, proposed)
    assert max(accepted) == min(k, BLOCK - head.config.offset)      # whole blocks accepted too


@KINDS
@pytest.mark.parametrize("spec", ["dynamic:4,3,12", "dynamic:8,2,10", "static"])
def test_trees_cost_one_drafter_forward_and_stay_lossless(target4, cls, spec, tmp_path):
    if spec == "static":
        (tmp_path / "t.json").write_text(json.dumps([[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 0, 0, 0]]))
        spec = f"static:{tmp_path / 't.json'}"
    shape = TreeShape.parse(spec)
    head = block_head(cls, target4)
    proposer = BlockProposer(head, target4.model)
    forwards = count_drafter_forwards(proposer, target4)
    accepted, proposed = [], []
    for prompt in prompts(4, seed=4):
        ar = autoregressive_generate(target4, prompt, max_new_tokens=30)
        before = forwards[0]
        sd = speculative_generate(target4, proposer, prompt, k=shape.depth, tree=shape, max_new_tokens=30)
        assert sd.tokens == ar.tokens
        assert forwards[0] - before == sum(1 for n in sd.proposed if n > 0)
        assert max(sd.proposed) > max(sd.depth)                              # it did branch
        assert max(sd.depth) <= min(shape.depth, BLOCK - head.config.offset)   # depth 8 clipped to the block
        accepted, proposed = accepted + sd.accepted, proposed + sd.proposed
    assert_mixed(accepted, proposed)
    assert max(accepted) >= 3


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=20)])
def test_exact_law_per_step_with_the_markov_bias(target4, sampling):
    """Draft i's recorded q is the law it was drawn from: the block's logits at its slot plus the Markov bias
    of the token drafted before it, and verification then emits the target's law at every step."""
    head = block_head(DSparkHead, target4, draft_vocab=60)
    with torch.no_grad():
        head.markov_head.markov_w1.weight.mul_(40)        # a bias that moves the law visibly
    proposer = BlockProposer(head, target4.model)
    prompt = prompts(1)[0]
    state = observed(proposer, target4, prompt)
    hidden = fresh_block(head, target4, prompt)
    for seed in range(4):
        draft = proposer.propose(state, 3, make_sampler(sampling, torch.Generator().manual_seed(seed)))
        assert draft.q.shape == (3, VOCAB) and bool((draft.q[:, ~head.t2d] == 0).all())
        prev = [prompt[-1]] + draft.tokens[:-1]
        for i in range(3):
            torch.testing.assert_close(draft.q[i], warp(fresh_logits(head, hidden, i, prev[i]), sampling),
                                       rtol=1e-5, atol=1e-6)
            assert draft.q[i, draft.tokens[i]] > 0
        other = next(t for t in head.draft_ids.tolist() if t != prev[1])
        assert (warp(fresh_logits(head, hidden, 1, other), sampling) - draft.q[1]).abs().max() > 1e-3   # q_2 | x_1
    for i in range(3):      # one verify step's law at each depth, the earlier drafts accepted
        p = warp(target4.forward(prompt + draft.tokens[:i], target4.new_cache(), last_only=True).logits[-1], sampling)
        torch.testing.assert_close(law_of_verify_sampling(p, draft.q[i]), p, rtol=0, atol=1e-6)


class Gold(DraftSampler):
    """Drafts the data's tokens (teacher forcing) and keeps the logits it was shown."""

    def __init__(self, gold: list[int]):
        super().__init__(Sampling())
        self.gold, self.seen = gold, []

    def __call__(self, logits):
        self.seen.append(logits.clone())
        return self.gold[len(self.seen) - 1], None


@KINDS
def test_training_layout_is_drafting_across_observes_and_a_rollback(target4, cls):
    """Draft i of the training block at anchor a (gold previous tokens) has the logits (and dspark's
    confidence) the proposer drafts with after observing positions < a, whether those came in one
    prefill, a prefill and a verified step, or after a rollback; the cached context keys / values equal a
    fresh computation."""
    head = block_head(cls, target4)
    drafts = head.config.drafts
    module = BlockTrainModule(head, target4.model, Objective(), max_anchors=6).eval()
    x = torch.tensor(prompts(1, length=20, seed=4))
    attention, mask = torch.ones_like(x), torch.ones(1, 19, dtype=torch.bool)
    _, taps = target_signals(target4.model, x, attention, mask, module.target_layers)
    train = {}
    with torch.no_grad():
        kv = head.context(head.fuse(taps), torch.arange(20)[None])
        for anchors, real in module._anchors(mask):
            part = module._slice(x, attention, mask, kv, target_parts(target4.model)[0], anchors, real,
                                 torch.arange(19)[None])
            for a in anchors[0].tolist():
                at = part["anchor"] == a
                train[a] = (part["logits"][at], None if part["confidence"] is None else part["confidence"][at])
    assert sorted(train) == list(range(19))

    tokens = x[0].tolist()
    proposer = BlockProposer(head, target4.model)
    proposer.reset()
    cache, layers = target4.new_cache(), proposer.hidden_layers

    def step(start: int, end: int) -> None:
        """The target reads positions start..end-1 (a prefill, or a root and its accepted drafts)."""
        out = target4.forward(tokens[start:end], cache, layers)
        proposer.observe(DecodeState(tokens=tokens[:end + 1], committed=end, hidden=out.hidden, hidden_start=start))
        assert proposer.length == end
        with torch.no_grad():
            fresh = head.context(head.fuse([h[:, :end] for h in taps]), torch.arange(end)[None])
        for (k, v), (k2, v2) in zip(proposer.kv, fresh):
            torch.testing.assert_close(k, k2, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v, v2, rtol=1e-4, atol=1e-5)
        sampler = Gold(tokens[end + 1:])
        draft = proposer.propose(DecodeState(tokens=tokens[:end + 1], committed=end, hidden=[], hidden_start=end),
                                 drafts, sampler)
        logits, conf = train[end]
        assert len(sampler.seen) == len(draft.tokens) == logits.shape[0] == drafts
        torch.testing.assert_close(torch.stack(sampler.seen)[:, head.draft_ids], logits, rtol=1e-4, atol=1e-4)
        if conf is None:
            assert draft.accept is None
        else:
            torch.testing.assert_close(torch.tensor(draft.accept), torch.sigmoid(conf), rtol=1e-4, atol=1e-5)

    step(0, 5)                               # prefill
    step(5, 9)                               # a verified step: the root x_5 and three accepted drafts
    target4.rollback(cache, 7)               # a decoder that takes two positions back
    step(7, 13)
    step(13, 14)


def batch(target, module, n=3, length=20, seed=1):
    ids = torch.tensor(prompts(n, length=length, seed=seed))
    ids[1, 6] = MASK                                       # the mask id as a real token
    attention = torch.ones_like(ids)
    attention[0, length - 4:] = 0
    mask = torch.ones(n, length - 1, dtype=torch.bool) & attention[:, 1:].bool()
    mask[:, :3] = False
    t_logits, hidden = target_signals(target.model, ids, attention, mask, module.target_layers)
    return ids, attention, mask, hidden, t_logits


# ------------------------------------------------------------------------------------ training

@KINDS
def test_training_lowers_the_loss_with_the_lm_head_frozen(target4, cls):
    torch.manual_seed(0)
    head = block_head(cls, target4).float().train()
    module = BlockTrainModule(head, target4.model, Objective(), max_anchors=32)
    frozen = head.lm_head.weight.detach().clone()
    assert not head.lm_head.weight.requires_grad
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    data = batch(target4, module)
    losses = []
    for _ in range(15):
        _, loss = module(*data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert head.lm_head.weight.grad is None and torch.equal(head.lm_head.weight, frozen)
    d = head.config.drafts
    assert {f"alpha_pos{i}" for i in range(d)} <= set(module.train_stats)
    assert ("confidence_abs_error" in module.train_stats) == (cls is DSparkHead)
    module.eval()
    with torch.no_grad():
        logits, loss = module(*data)
    t_logits = data[4]
    assert logits.shape == t_logits.shape and torch.isfinite(loss)
    assert bool(torch.isinf(logits[:, ~head.t2d]).all()) and bool(torch.isfinite(logits[:, head.t2d]).all())
    # row r is the first draft at the data's row r: its greedy match is the target's at that row
    assert module.step_stats["parallel_greedy_match_depth0"] == pytest.approx(
        float((logits.argmax(-1) == t_logits.argmax(-1)).float().mean()))
    logged = {f"parallel_greedy_match_depth{i}" for i in range(d)} | {f"parallel_tau_greedy_k{d}"}
    assert logged <= set(module.step_stats)


@pytest.mark.parametrize("weights", POSITION_WEIGHTS)
def test_every_position_weight_option_trains_a_block(target4, weights):
    for cls in (DFlashHead, DSparkHead):
        head = block_head(cls, target4).train()
        module = BlockTrainModule(head, target4.model, Objective(position_weights=weights), max_anchors=6)
        _, loss = module(*batch(target4, module))
        assert torch.isfinite(loss)
        loss.backward()
        moved = [head.fc.weight, head.layers[0].self_attn.q_proj.weight, head.layers[-1].mlp.down_proj.weight]
        if cls is DSparkHead:
            moved += [head.markov_head.markov_w1.weight, head.markov_head.markov_w2.weight,
                      head.confidence_head.proj.weight]
        for p in moved:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (cls, weights)


# ------------------------------------------------------------------------------------ confidence

@KINDS
def test_each_node_carries_the_heads_predicted_acceptance(target4, cls, tmp_path):
    """A chain: every node, sigmoid(confidence(previous token, its slot)). A tree: the most likely child of
    each node (what a chain would draft) only, its siblings None."""
    head = block_head(cls, target4)
    proposer = BlockProposer(head, target4.model)
    prompt = prompts(1, seed=2)[0]
    state = observed(proposer, target4, prompt)
    hidden = fresh_block(head, target4, prompt)
    sampler = make_sampler(Sampling(), None)
    (tmp_path / "t.json").write_text(json.dumps([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]]))
    chain = proposer.propose(state, 8, sampler)
    trees = [proposer.propose(state, 4, sampler, tree=TreeShape.parse(spec))
             for spec in ("dynamic:4,3,12", f"static:{tmp_path / 't.json'}")]
    assert len(chain.tokens) == head.config.drafts
    for draft in [chain] + trees:
        if cls is DFlashHead:
            assert draft.accept is None
            continue
        parents = draft.parents if draft.parents is not None else list(range(-1, len(draft.tokens) - 1))
        assert len(draft.accept) == len(draft.tokens) == len(parents)
        for i, (parent, depth) in enumerate(zip(parents, depths(parents))):
            siblings = [j for j, p in enumerate(parents) if p == parent]
            if max(siblings, key=lambda j: draft.conf[j]) != i:
                assert draft.accept[i] is None, (i, parents)
                continue
            prev = prompt[-1] if parent < 0 else draft.tokens[parent]
            assert 0 < draft.accept[i] < 1
            assert draft.accept[i] == pytest.approx(fresh_accept(head, hidden, depth, prev), abs=1e-5)
        assert sum(a is not None for a in draft.accept) == len(set(parents))    # one per expanded node


def test_a_fixed_tree_ranks_nodes_by_draft_probability_not_by_the_head(target4):
    """Without `--k auto` a tree's nodes are ranked by their cumulative draft probability (EAGLE-2), as for
    any drafter: the confidence head's prediction, which all siblings share, must not flatten the ranking."""
    head = block_head(DSparkHead, target4)
    proposer = BlockProposer(head, target4.model)
    prompt = prompts(1, seed=2)[0]
    sampler = make_sampler(Sampling(), None)
    tree = TreeShape.parse("dynamic:4,3,12")
    with_head = proposer.propose(observed(proposer, target4, prompt), 4, sampler, tree=tree)
    confidence, head.confidence_head = head.confidence_head, None
    without = proposer.propose(observed(proposer, target4, prompt), 4, sampler, tree=tree)
    head.confidence_head = confidence
    assert without.accept is None and with_head.accept is not None
    assert (with_head.tokens, with_head.parents, with_head.conf) == (without.tokens, without.parents, without.conf)
    assert max(depths(with_head.parents)) == 4


FLAT = CostCurve([1, 64], [0.010, 0.0101])


def test_the_rule_takes_predicted_acceptance_over_its_calibration():
    conf, parents = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [-1, 0, 1, 2, 3, 4]
    rule = DraftLengthRule(FLAT)
    assert rule.choose(conf, parents, draft_s=0.0) == 6                        # calibrated confidences pay
    assert rule.choose(conf, parents, draft_s=0.0, accept=[1e-6] * 6) == 0      # the head says they will fail
    accept = [0.9, 0.5, 0.5, 0.2, 0.1, 0.1]
    want = torch.tensor(accept).cumprod(0).tolist()
    assert rule.path_values(conf, parents, accept) == pytest.approx(want)
    tree = [-1, -1, 0, 0, 2]
    assert rule.path_values(None, tree, [0.5, 0.4, 0.3, 0.2, 0.1]) == pytest.approx([0.5, 0.4, 0.15, 0.1, 0.015])


class CountingCalibration(Calibration):
    calls = 0

    def __call__(self, conf, depth):
        self.calls += 1
        return super().__call__(conf, depth)


@KINDS
def test_k_auto_uses_the_confidence_head_and_records_predictions(target4, cls):
    """dspark: the rule never asks its calibration (the head predicts every node), and each step records
    (depth, predicted, accepted) for exactly the nodes it reached; dflash: calibration, nothing recorded."""
    head = block_head(cls, target4)

    class Recording(BlockProposer):
        drafts: list = []

        def propose(self, *args, **kwargs):
            self.drafts.append(super().propose(*args, **kwargs))
            return self.drafts[-1]

    for rule in (DraftLengthRule(CostCurve([1, 2, 3, 8], [0.01, 0.0102, 0.0104, 0.02])), None):
        if rule is not None:
            rule.calibration = CountingCalibration()
        for prompt in prompts(2, seed=7):
            proposer = Recording(head, target4.model)
            proposer.drafts = []
            ar = autoregressive_generate(target4, prompt, max_new_tokens=24)
            sd = speculative_generate(target4, proposer, prompt, k=8 if rule else 4, rule=rule, max_new_tokens=24)
            assert sd.tokens == ar.tokens
            if cls is DFlashHead:
                assert sd.predicted == [] and all(d.accept is None for d in proposer.drafts)
                continue
            if rule is None:     # a chain verifies the whole draft: its first accepted + 1 nodes were reached
                steps = [a for a, n in zip(sd.accepted, sd.proposed) if n]
                want = [(i + 1, d.accept[i], i < a) for a, d in zip(steps, proposer.drafts)
                        for i in range(min(a + 1, len(d.tokens)))]
                assert sd.predicted == want
            assert sum(ok for _, _, ok in sd.predicted) == sum(sd.accepted)
            assert all(0 < p < 1 for _, p, _ in sd.predicted)
        if rule is not None:
            assert (rule.calibration.calls == 0) == (cls is DSparkHead)
            assert max(rule.chosen) <= head.config.drafts


def test_reached_nodes_are_the_children_of_the_root_and_of_the_accepted_path():
    parents, accept = [-1, -1, 0, 0, 2], [0.9, 0.8, 0.7, 0.6, 0.5]
    assert _reached(parents, accept, [0, 2]) == [(1, 0.9, True), (1, 0.8, False), (2, 0.7, True), (2, 0.6, False),
                                                 (3, 0.5, False)]
    assert _reached(parents, accept, [0]) == [(1, 0.9, True), (1, 0.8, False), (2, 0.7, False), (2, 0.6, False)]
    assert _reached(parents, accept, []) == [(1, 0.9, False), (1, 0.8, False)]
    # a tree's lower-ranked siblings carry no prediction and are left out
    assert _reached(parents, [0.9, None, 0.7, None, 0.5], [0, 2]) == [(1, 0.9, True), (2, 0.7, True), (3, 0.5, False)]


# ------------------------------------------------------------------------------------ report

def record(predicted, **kw) -> PromptRecord:
    return PromptRecord(id="p", turn=1, prompt_tokens=3, ar_tokens=[1, 2, 3], ar_s=1.0, sd_tokens=[1, 2, 3], sd_s=0.5,
                        proposed=[2, 2], accepted=[1, 0], emitted=[2, 1], predicted=predicted, **kw)


def test_reliability_table_from_hand_made_predictions():
    first = [(1, 0.9, True), (2, 0.6, True), (3, 0.5, False), (1, 0.7, False)]
    second = [(1, 0.8, True), (2, 0.4, False)]
    want = [{"position": 1, "predicted": 0.8, "measured": 2 / 3, "count": 3, "abs_gap": 0.8 - 2 / 3},
            {"position": 2, "predicted": 0.5, "measured": 0.5, "count": 2, "abs_gap": 0.0},
            {"position": 3, "predicted": 0.5, "measured": 0.0, "count": 1, "abs_gap": 0.5}]
    rows = reliability_by_position(first + second)
    intervals = [row.pop("measured_ci95") for row in rows]
    assert [row.pop("calibrated") for row in rows] == [True, True, True]    # 1 and 3: too few nodes to tell
    assert rows == [pytest.approx(row) for row in want]
    assert intervals[0] == pytest.approx([0.2077, 0.9385], abs=1e-4) and intervals[2] == pytest.approx([0, 0.7935], abs=1e-4)
    miss = reliability_by_position([(1, 0.9, i % 2 == 0) for i in range(100)])[0]   # 50 of 100, predicted 0.9
    assert miss["measured_ci95"] == pytest.approx([0.4038, 0.5962], abs=1e-4) and not miss["calibrated"]
    assert reliability_by_position([(1, 0.54, i % 2 == 0) for i in range(100)])[0]["calibrated"]
    rows = reliability_by_position(first + second)
    report = summarize([record(first), record(second)], 2, greedy=True)
    assert report["confidence_reliability"] == rows
    assert report["confidence_abs_gap"] == pytest.approx((3 * (0.8 - 2 / 3) + 0 + 0.5) / 6)
    assert report["confidence_calibrated"] is True
    plain = summarize([record([]), record([])], 2, greedy=True)
    assert plain["confidence_reliability"] is None and plain["confidence_abs_gap"] is None
    assert plain["unplaced_nodes_per_step"] == 0.0
    assert summarize([record([], unplaced=3), record([], unplaced=1)], 2, greedy=True)["unplaced_nodes_per_step"] == 1.0
    rule = DraftLengthRule(FLAT)
    assert acceptance_source(None, [record(first)]) == "fixed k"
    assert acceptance_source(rule, [record([]), record(second)]) == "confidence head"
    assert acceptance_source(rule, [record([])]) == "online calibration"


# ------------------------------------------------------------------------------------ formats

@KINDS
def test_own_folder_round_trip_and_bad_configs(target4, cls, tmp_path):
    head = block_head(cls, target4)
    head.save_pretrained(tmp_path / "own")
    raw = json.loads((tmp_path / "own" / "config.json").read_text())
    assert raw["draftsmith_kind"] == ("dspark" if cls is DSparkHead else "dflash")
    loaded = read_head_folder(tmp_path / "own", target4.num_layers)
    assert type(loaded) is cls and loaded.config == head.config
    assert all(torch.equal(x, y) for x, y in zip(loaded.state_dict().values(), head.state_dict().values()))
    assert loaded.state_dict().keys() == head.state_dict().keys()
    via_cli = load_drafter(str(tmp_path / "own"), target4)
    assert isinstance(via_cli, BlockProposer) and type(via_cli.head) is cls
    tree = TreeShape.parse("dynamic:4,2,8")
    for prompt in prompts(2, seed=5):
        a = speculative_generate(target4, BlockProposer(head, target4.model), prompt, k=4, tree=tree, max_new_tokens=16)
        b = speculative_generate(target4, via_cli, prompt, k=4, tree=tree, max_new_tokens=16)
        assert (a.tokens, a.accepted, a.proposed, a.predicted) == (b.tokens, b.accepted, b.proposed, b.predicted)
    bad = [("block_size", 1)] + ([("markov_rank", -1)] if cls is DSparkHead else [])
    for key, value in bad:
        folder = tmp_path / f"bad-{key}"
        folder.mkdir()
        shutil.copy(tmp_path / "own" / "model.safetensors", folder)
        (folder / "config.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(DraftsmithError, match=key):
            read_head_folder(folder, target4.num_layers)


# ------------------------------------------------------------------------------------ end to end

def test_train_resume_export_and_eval(setup, tmp_path, capsys):  # noqa: F811
    """dflash: train, lose the last checkpoint, resume bit for bit, export, eval at a fixed k; dspark with
    its Markov and confidence heads: train, export, eval with --k auto, whose report says the rule used
    the confidence head and holds its reliability table."""
    from draftsmith.cli import main

    common = ["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "drafter.block_size=4",
              "drafter.max_anchors=8", "drafter.num_layers=1", "drafter.draft_vocab_size=200",
              "train.max_steps=4", "checkpoint.every=2", "eval.every=2"]
    flash = common + ["drafter.kind=dflash"]
    spark = common + ["drafter.kind=dspark", "drafter.markov_rank=16", "drafter.confidence_head=true",
                      "drafter.aux_layers=[0,1]", "loss.confidence_weight=0.5"]
    assert main(flash + ["run.name=flash"]) == 0
    assert "dflash mask token" in capsys.readouterr().out
    assert main(spark + ["run.name=spark"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "spark" / "metrics.jsonl").read_text().splitlines()]
    assert any("parallel_greedy_match_depth3" in x for x in lines)        # dspark drafts all 4 slots
    assert any("confidence_abs_error" in x for x in lines)
    # resume: run b loses its last checkpoint, resumes from step 2 and ends where run flash did
    assert main(flash + ["run.name=b"]) == 0
    shutil.rmtree(ckpt_path(tmp_path / "b", 4))
    (tmp_path / "b" / "summary.json").unlink(missing_ok=True)
    capsys.readouterr()
    assert main(flash + ["run.name=b", "--resume"]) == 0
    assert f"resumed from {ckpt_path(tmp_path / 'b', 2)} (step 2)" in capsys.readouterr().out
    assert_same_checkpoint(ckpt_path(tmp_path / "flash", 4), ckpt_path(tmp_path / "b", 4))

    for run, k in (("flash", "3"), ("spark", "auto")):
        out = tmp_path / f"{run}-hf"
        assert main(["export", str(tmp_path / run), "--format", "hf", "--out", str(out)]) == 0
        kind = json.loads((out / "config.json").read_text())["draftsmith_kind"]
        assert kind == ("dflash" if run == "flash" else "dspark")
        assert main(["eval", "--target", str(setup / "target"), "--drafter", str(out), "--bench",
                     str(setup / "bench.jsonl"), "--max-new-tokens", "16", "--k", k, "--k-max", "4",
                     "--device", "cpu", "--out", str(tmp_path / f"eval-{run}")]) == 0
        report = json.loads((tmp_path / f"eval-{run}" / "report.json").read_text())
        md = (tmp_path / f"eval-{run}" / "report.md").read_text()
        assert report["lossless_match_rate"] == 1.0 and "| lossless_match_rate | 1.000 |" in md
        if run == "flash":
            assert report["draft_length"]["acceptance_source"] == "fixed k"
            assert report["confidence_reliability"] is None and "Confidence head reliability" not in md
        else:
            assert report["draft_length"]["acceptance_source"] == "confidence head"
            table = report["confidence_reliability"]
            assert table and table[0]["position"] == 1 and sum(r["count"] for r in table) > 0
            assert "## Confidence head reliability" in md
            assert "| draft_length acceptance_source | confidence head |" in md
