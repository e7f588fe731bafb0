"""`--k auto`: the cost curve interpolates, the calibration learns, the rule verifies more where
verification is cheap and less where it is dear, stops drafting early, and decoding stays lossless."""

import copy

import pytest
import torch

from draftsmith.eval.decoder import autoregressive_generate, speculative_generate
from draftsmith.eval.draft_length import Calibration, CostCurve, DraftLengthRule, measure_cost_curve
from draftsmith.models.prompt_lookup import PromptLookupProposer
from draftsmith.models.small_lm import SmallLMProposer
from draftsmith.protocol.drafting import TreeShape

from conftest import prompts, tiny_llama

FLAT = CostCurve([1, 64], [0.010, 0.0101])          # a GPU: 64 tokens cost what one does
STEEP = CostCurve([1, 2, 8], [0.010, 0.020, 0.080])  # every verified token costs a full forward


def test_cost_curve_interpolates_and_extends():
    curve = CostCurve([1, 2, 4], [1.0, 2.0, 3.0])
    assert curve(1) == 1.0 and curve(3) == 2.5 and curve(6) == 4.0 and curve(0) == 1.0
    assert curve.as_dict() == {"tokens": [1, 2, 4], "ms": [1000.0, 2000.0, 3000.0]}


def test_measured_curve_is_monotone(target):
    curve = measure_cost_curve(target, sizes=(1, 2, 4, 8), context=16, reps=1)
    assert curve.sizes == [1, 2, 4, 8]
    assert all(b >= a > 0 for a, b in zip(curve.seconds, curve.seconds[1:]))


def test_calibration_learns_from_outcomes():
    cal = Calibration(explore=0.0)
    assert cal(0.95, 1) == pytest.approx(0.95)        # the prior is the confidence itself
    for _ in range(50):
        cal.record(0.95, 1, accepted=False)
    assert cal(0.95, 1) < 0.1                          # an overconfident drafter is corrected
    assert cal(None, 3) == pytest.approx(0.5)          # no confidence: by depth
    cal.record(None, 3, True)
    assert cal(None, 3) > 0.5


def test_rule_verifies_more_where_verification_is_cheap():
    conf, parents = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [-1, 0, 1, 2, 3, 4]
    assert DraftLengthRule(FLAT).choose(conf, parents, draft_s=0.0) == 6
    assert DraftLengthRule(STEEP).choose(conf, parents, draft_s=0.0) == 0
    # half-way: a forward over 2 tokens costs what one does, more cost more
    mid = CostCurve([1, 2, 3, 8], [0.010, 0.010, 0.016, 0.050])
    assert DraftLengthRule(mid).choose(conf, parents, draft_s=0.0) == 1


def test_rule_stops_drafting_when_a_node_does_not_pay():
    rule = DraftLengthRule(STEEP)
    assert not rule.worth(0.3, 1)
    assert DraftLengthRule(FLAT).worth(0.3, 1)


@pytest.mark.parametrize("curve", [FLAT, STEEP, CostCurve([1, 2, 3, 8], [0.01, 0.0105, 0.016, 0.05])])
def test_auto_is_lossless_and_varies_lengths(target, curve):
    noisy = copy.deepcopy(target.model)
    torch.manual_seed(3)
    with torch.no_grad():
        for w in noisy.parameters():
            w.add_(torch.randn_like(w) * w.std() * 0.5)
    rule = DraftLengthRule(curve)
    for prompt in prompts(3, seed=9):
        ar = autoregressive_generate(target, prompt, max_new_tokens=30)
        sd = speculative_generate(target, SmallLMProposer(noisy), prompt, k=8, rule=rule, max_new_tokens=30)
        assert sd.tokens == ar.tokens
    hist = rule.histogram()
    if curve is FLAT:
        assert max(hist) >= 6
    if curve is STEEP:
        assert max(hist) <= 1


def test_auto_with_trees_and_lookup_is_lossless(target):
    rule = DraftLengthRule(CostCurve([1, 2, 3, 8, 32], [0.01, 0.0105, 0.012, 0.02, 0.06]))
    tree = TreeShape.parse("dynamic:5,4,24")
    for proposer in (SmallLMProposer(tiny_llama(1)), PromptLookupProposer()):
        for prompt in prompts(2, seed=13):
            prompt = prompt + prompt
            ar = autoregressive_generate(target, prompt, max_new_tokens=24)
            assert speculative_generate(target, proposer, prompt, k=5, tree=tree, rule=rule,
                                        max_new_tokens=24).tokens == ar.tokens


def test_calibration_explores_young_bins():
    """A bin never verified is valued optimistically, so the rule tries it and learns its real rate."""
    cal = Calibration()
    assert cal(0.15, 1) > 0.5
    for _ in range(400):
        cal.record(0.15, 1, accepted=False)
    assert cal(0.15, 1) < 0.05


def test_chain_drafts_no_node_that_cannot_pay():
    """A child's value is at most its parent's, so when a node's own value would not pay for one
    more node the chain stops without the next draft forward (no drafted-then-dropped nodes)."""
    from draftsmith.protocol.drafting import DraftSampler, grow_draft
    from draftsmith.protocol.sampling import Sampling

    calls = []

    def expand(nodes, tokens, parents):
        calls.append(list(nodes))
        return torch.tensor([[0.0, 5.0, 0.0, 0.0]])   # a confident next token, were it drafted

    root = torch.tensor([0.0, 0.0, 0.0, 0.1])          # an unsure first token: value ~0.25 + bonus
    steep = DraftSampler(Sampling(), rule=DraftLengthRule(STEEP))
    draft = grow_draft(expand, root, 8, steep)
    assert draft.tokens == [3] and calls == []
    flat = DraftSampler(Sampling(), rule=DraftLengthRule(FLAT))
    assert len(grow_draft(expand, root, 8, flat).tokens) == 8 and len(calls) == 7


def test_rule_asks_one_past_the_deepest_recent_draft():
    rule = DraftLengthRule(STEEP, window=3)
    assert rule.depth(8) == 8                           # no history: the whole depth
    for parents in ([-1], [], [-1]):                    # verified depths 1, 0, 1
        rule.update([0.5] * len(parents), parents, [], len(parents), 0.001, 0.01, 1)
    assert rule.depth(8) == 2 and rule.depth(1) == 1
    rule.update([0.9, 0.9, 0.9], [-1, 0, 1], [0, 1, 2], 3, 0.001, 0.01, 4)
    assert rule.depth(8) == 4                           # a deep draft paid: grow
    for _ in range(3):
        rule.update([], [], [], 0, 0.0, 0.01, 1)
    assert rule.depth(8) == 1                           # the window forgets it


class OneShot(PromptLookupProposer):
    """Records the depth the decoder asks for (what a parallel drafter's one forward would pay)."""

    def __init__(self):
        super().__init__()
        self.asked: list[int] = []

    def propose(self, state, k, sampler, tree=None):
        self.asked.append(k)
        return super().propose(state, k, sampler, tree=tree)


def test_one_shot_drafters_are_asked_for_no_more_than_pays(target):
    proposer, rule = OneShot(), DraftLengthRule(STEEP)
    for prompt in prompts(2, seed=5):
        ar = autoregressive_generate(target, prompt, max_new_tokens=24)
        assert speculative_generate(target, proposer, prompt, k=8, rule=rule, max_new_tokens=24).tokens == ar.tokens
    assert proposer.asked[0] == 8 and max(proposer.asked[-10:]) <= 2
