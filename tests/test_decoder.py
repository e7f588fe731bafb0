"""The decoder's promises: lossless greedy output, full acceptance for a perfect drafter, cache
consistency after partial acceptance, EOS and max_new_tokens honoured mid-step."""

import copy

import pytest
import torch

from draftsmith.errors import DraftsmithError
from draftsmith.eval.decoder import NoDraft, autoregressive_generate, speculative_generate
from draftsmith.models.prompt_lookup import PromptLookupProposer, lookup
from draftsmith.models.small_lm import SmallLMProposer
from draftsmith.protocol.sampling import Sampling

from conftest import noisy_copy, prompts, tiny_llama


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_equality_with_random_drafter(target, other_model, k):
    drafter = SmallLMProposer(other_model)
    for prompt in prompts(3, seed=k):
        ar = autoregressive_generate(target, prompt, max_new_tokens=24)
        sd = speculative_generate(target, drafter, prompt, k=k, max_new_tokens=24)
        assert sd.tokens == ar.tokens
        assert len(sd.tokens) == 24


def test_greedy_equality_with_partially_right_drafter(target):
    # a noisy copy of the target agrees often but not always, exercising partial acceptance
    # and the rollback of both caches
    drafter = SmallLMProposer(noisy_copy(target.model))
    total_accepted, total_proposed = 0, 0
    for prompt in prompts(4, seed=5):
        ar = autoregressive_generate(target, prompt, max_new_tokens=40)
        sd = speculative_generate(target, drafter, prompt, k=4, max_new_tokens=40)
        assert sd.tokens == ar.tokens
        total_accepted += sum(sd.accepted)
        total_proposed += sum(sd.proposed)
    assert 0 < total_accepted < total_proposed


@pytest.mark.parametrize("k", [1, 3, 5])
def test_drafter_equal_to_target_accepts_everything(target, k):
    drafter = SmallLMProposer(copy.deepcopy(target.model))
    max_new = 1 + 4 * (k + 1) + 2          # prefill token, four full steps, a clipped last step
    sd = speculative_generate(target, drafter, prompts(1)[0], k=k, max_new_tokens=max_new)
    assert len(sd.tokens) == max_new
    assert sd.accepted == sd.proposed
    assert sd.emitted[:-1] == [k + 1] * (sd.steps - 1)
    assert sd.emitted[-1] == 2 and sd.proposed[-1] == 1   # clipped to what max_new_tokens leaves
    assert sd.tau == pytest.approx((max_new - 1) / sd.steps)


def test_eos_mid_step_stops_there(target):
    prompt = prompts(1)[0]
    ar = autoregressive_generate(target, prompt, max_new_tokens=30)
    eos = ar.tokens[9]
    stop = ar.tokens.index(eos)
    drafter = SmallLMProposer(copy.deepcopy(target.model))   # accepts everything: EOS lands mid-step
    sd = speculative_generate(target, drafter, prompt, k=4, max_new_tokens=30, eos_token_ids=(eos,))
    assert sd.tokens == ar.tokens[: stop + 1]
    assert sd.stop_reason == "eos"
    ar_eos = autoregressive_generate(target, prompt, max_new_tokens=30, eos_token_ids=(eos,))
    assert ar_eos.tokens == sd.tokens


def test_max_new_tokens_one(target):
    sd = speculative_generate(target, PromptLookupProposer(), prompts(1)[0], k=4, max_new_tokens=1)
    assert len(sd.tokens) == 1 and sd.steps == 0


def test_context_limit(target):
    small = copy.deepcopy(target)
    small.max_length = 20
    sd = speculative_generate(small, PromptLookupProposer(), prompts(1, length=12)[0], k=4, max_new_tokens=50)
    assert 12 + len(sd.tokens) == 21 and sd.stop_reason == "context"
    with pytest.raises(DraftsmithError, match="longer than the target's context"):
        speculative_generate(small, PromptLookupProposer(), list(range(3, 25)), k=4)


def test_cache_rollback_equals_fresh_forward(target):
    prompt = prompts(1)[0]
    cache = target.new_cache()
    target.forward(prompt, cache)
    target.forward([5, 6, 7, 8], cache, hidden_layers=(-1,))
    target.rollback(cache, len(prompt) + 2)
    rolled = target.forward([9, 10], cache, hidden_layers=(0, -1))
    fresh = target.forward(prompt + [5, 6, 9, 10], target.new_cache(), hidden_layers=(0, -1))
    torch.testing.assert_close(rolled.logits, fresh.logits[-2:], rtol=1e-5, atol=1e-5)
    for a, b in zip(rolled.hidden, fresh.hidden):
        torch.testing.assert_close(a, b[-2:], rtol=1e-5, atol=1e-5)


def test_prompt_lookup_finds_most_recent_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 4, 5, 7, 1, 2]
    assert lookup(tokens, k=3) == [[4, 5, 7]]          # "1 2" most recently followed by 4 5 7
    assert lookup([5, 6, 7, 8], k=2) == []            # nothing repeats
    assert lookup([3, 1, 4, 1], k=5, min_ngram=1) == [[4, 1]]   # unigram "1", truncated at the end
    assert lookup([3, 1, 4, 1], k=5) == []                    # bigrams only by default
    assert lookup([7, 8, 7, 8], k=2, min_ngram=3) == []


def test_prompt_lookup_greedy_equality(target):
    prompt = [10, 11, 12, 13] * 4
    ar = autoregressive_generate(target, prompt, max_new_tokens=30)
    sd = speculative_generate(target, PromptLookupProposer(), prompt, k=4, max_new_tokens=30)
    assert sd.tokens == ar.tokens
    assert sum(sd.proposed) > 0


def test_sampling_is_reproducible_with_a_seed(target, other_model):
    drafter = SmallLMProposer(other_model)
    runs = [speculative_generate(target, drafter, prompts(1)[0], k=3, max_new_tokens=20,
                                 sampling=Sampling(temperature=1.0, top_p=0.9),
                                 generator=torch.Generator().manual_seed(7)).tokens for _ in range(2)]
    assert runs[0] == runs[1]


def test_hidden_states_shown_to_proposer_cover_committed_positions(target):
    seen = []

    class Recorder(PromptLookupProposer):
        hidden_layers = (-1,)

        def observe(self, state):
            assert state.hidden[0].shape[0] == state.committed - state.hidden_start
            seen.append((state.hidden_start, state.committed))

    speculative_generate(target, Recorder(), [4, 5, 6, 4, 5, 6, 4, 5], k=3, max_new_tokens=12)
    # contiguous: each observation starts where the previous ended
    assert seen[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(seen, seen[1:]))


class _Taps(NoDraft):
    """Drafts nothing (NoDraft) and keeps the tapped hidden states' shapes it was shown."""

    hidden_layers = (0, -1)

    def reset(self):
        self.seen = []

    def observe(self, state):
        self.seen.append([h.shape for h in state.hidden])


def test_prefill_reads_the_prompt_like_plain_decoding_and_keeps_every_tap(target, monkeypatch):
    """The prefill computes the last position's logits only (the call plain decoding makes) and still shows the
    proposer every tapped layer at every prompt position."""
    calls = []
    forward = type(target).forward

    def spy(self, ids, cache, hidden_layers=(), last_only=False, parents=None):
        out = forward(self, ids, cache, hidden_layers, last_only, parents)
        calls.append((len(ids), last_only, out.logits.shape[0]))
        return out

    monkeypatch.setattr(type(target), "forward", spy)
    prompt = prompts(1, length=11)[0]
    proposer = _Taps()
    speculative_generate(target, proposer, prompt, k=2, max_new_tokens=1)
    autoregressive_generate(target, prompt, max_new_tokens=1)
    assert calls == [(11, True, 1), (11, True, 1)]
    hidden = target.model.config.hidden_size
    assert proposer.seen == [[torch.Size([11, hidden]), torch.Size([11, hidden])]]
