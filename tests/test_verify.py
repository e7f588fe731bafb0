"""Verification is lossless: the law of what one verify step emits equals the target's warped p,
computed exactly for random p and q, and matched by the sampling implementation itself."""

import pytest
import torch

from draftsmith.errors import DraftsmithError
from draftsmith.eval.verify import acceptance_probability, residual, step_law, verify_greedy, verify_sampling
from draftsmith.protocol.sampling import Sampling, warp

SAMPLINGS = [Sampling(1.0), Sampling(0.7), Sampling(1.3, top_k=5), Sampling(1.0, top_p=0.8),
             Sampling(0.9, top_k=6, top_p=0.9)]


def random_logits(seed: int, v: int = 12) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("seed", range(5))
def test_step_law_equals_warped_target(sampling, seed):
    p = warp(random_logits(seed), sampling)
    q = warp(random_logits(seed + 100), sampling)
    torch.testing.assert_close(step_law(p, q), p, rtol=0, atol=1e-6)


def law_of_verify_sampling(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The law of verify_sampling's first token, computed exactly from the implementation's own
    decisions: for each draft x, the acceptance threshold it uses and the residual it draws from."""
    law = torch.zeros_like(p)
    for x in range(len(q)):
        if q[x] == 0:
            continue
        a = acceptance_probability(p, q, x)
        law[x] += q[x] * a
        law += q[x] * (1 - a) * residual(p, q)
    return law


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_exact_law_of_the_implementation(sampling):
    for seed in range(5):
        p = warp(random_logits(seed), sampling)
        q = warp(random_logits(seed + 50), sampling)
        torch.testing.assert_close(law_of_verify_sampling(p, q), p, rtol=0, atol=1e-6)


def test_verify_sampling_accepts_iff_uniform_below_ratio():
    # drive verify_sampling with a generator and replay its uniforms to check each decision
    p = warp(random_logits(1), Sampling(1.0))
    q = warp(random_logits(2), Sampling(1.0))
    draft = [int(q.argmax()), int(q.argsort()[-2])]
    for seed in range(50):
        u = torch.rand(2, generator=torch.Generator().manual_seed(seed)).tolist()
        n, _ = verify_sampling(draft, torch.stack([q, q]), torch.stack([p, p, p]),
                               torch.Generator().manual_seed(seed))
        expect = 0
        while expect < 2 and u[expect] < acceptance_probability(p, q, draft[expect]):
            expect += 1
        assert n == expect


def test_verify_sampling_empirical_law_matches_p():
    # a sampled check on top of the exact ones: frequencies of the first emitted token
    p = warp(random_logits(3, v=5), Sampling(1.0))
    q = warp(random_logits(4, v=5), Sampling(1.0))
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    n_draws = 4000
    for _ in range(n_draws):
        x = int(torch.multinomial(q, 1, generator=g))
        n, nxt = verify_sampling([x], q[None], torch.stack([p, p]), g)
        counts[x if n == 1 else nxt] += 1
    freq = counts / n_draws
    assert (freq - p).abs().max() < 4 * (0.25 / n_draws) ** 0.5


def test_deterministic_draft_is_exact():
    # prompt lookup drafts carry no q: one-hot q must still give the law p
    p = warp(random_logits(5), Sampling(1.0))
    for x in range(len(p)):
        onehot = torch.nn.functional.one_hot(torch.tensor(x), len(p)).float()
        law = p[x] * onehot + (1 - p[x]) * residual(p, onehot)
        torch.testing.assert_close(law, p, rtol=0, atol=1e-6)


def test_greedy_verify():
    logits = torch.tensor([[0., 5, 1], [3, 0, 1], [0, 0, 9]])    # argmax 1, 0, 2
    assert verify_greedy([1, 0], logits) == (2, 2)               # all accepted + bonus
    assert verify_greedy([1, 2], logits) == (1, 0)               # correction at position 2
    assert verify_greedy([0, 0], logits) == (0, 1)
    assert verify_greedy([], logits[:1]) == (0, 1)


def test_warp_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    torch.testing.assert_close(warp(logits, Sampling(1.0, top_k=2)), torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(warp(logits, Sampling(1.0, top_p=0.8)), torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(warp(logits, Sampling(1.0, top_p=0.81)), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    assert warp(logits, Sampling(0.0)).tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("kwargs,match", [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                          ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k")])
def test_bad_sampling(kwargs, match):
    with pytest.raises(DraftsmithError, match=match):
        Sampling(**kwargs)
