"""Property tests for distill/losses.py: zeros, references with their direction, masks, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from draftsmith.distill import losses as L
from draftsmith.errors import DraftsmithError

B, T, V = 2, 5, 11
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd", "topk_forward_kl"]


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale  # [B, T, V]


def _mask() -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 3:] = False
    m[1, 0] = False
    return m  # [B, T]


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_divergence_is_zero_on_equal_inputs(name, temperature):
    x = _logits(0)
    value = L.get_loss(name)(x, x.clone(), mask=_mask(), temperature=temperature)
    assert value.abs().item() < 1e-6


def test_topk_forward_kl_minimum_is_the_renormalised_topk_target():
    # q log-probs come from q's full softmax, so the zero sits at q = p renormalised over K...
    t = _logits(0)
    k = 4
    kth = t.topk(k, dim=-1).values[..., -1:]
    d = torch.where(t >= kth, t, torch.full_like(t, -1e4))
    assert L.topk_forward_kl(t, d, k=k).abs().item() < 1e-6
    # ...while q = p pays -log p(K) for the target mass outside K.
    p_k = t.softmax(-1).topk(k, dim=-1).values.sum(-1)  # [B, T]
    assert torch.allclose(L.topk_forward_kl(t, t.clone(), k=k), (-p_k.log()).mean(), atol=1e-5)


def test_topk_forward_kl_with_full_k_is_forward_kl():
    t, d = _logits(0), _logits(1)
    assert torch.allclose(L.topk_forward_kl(t, d, k=V), L.forward_kl(t, d), atol=1e-5)
    assert torch.allclose(L.topk_forward_kl(t, d, k=10 * V), L.forward_kl(t, d), atol=1e-5)


def test_forward_kl_matches_kl_div_reference():
    t, d = _logits(0), _logits(1)
    temperature = 1.5
    log_p = F.log_softmax(t / temperature, -1)
    log_q = F.log_softmax(d / temperature, -1)
    # F.kl_div(input=log q, target=p) = Σ p (log p − log q) = KL(p‖q): expectation under the target.
    per_position = F.kl_div(log_q, log_p.exp(), reduction="none").sum(-1)  # [B, T]
    m = _mask()
    expected = per_position[m].mean()
    assert torch.allclose(L.forward_kl(t, d, mask=m, temperature=temperature), expected, atol=1e-6)


def test_reverse_kl_is_forward_kl_with_arguments_swapped():
    t, d = _logits(0), _logits(1)
    # KL(q‖p) = Σ q (log q − log p): expectation under the drafter.
    assert torch.allclose(L.reverse_kl(t, d), L.forward_kl(d, t), atol=1e-6)
    assert not torch.allclose(L.reverse_kl(t, d), L.forward_kl(t, d), atol=1e-3)


def test_jsd_symmetric_and_bounded_at_half():
    t, d = _logits(0, scale=20.0), _logits(1, scale=20.0)
    a, b = L.jsd(t, d, beta=0.5), L.jsd(d, t, beta=0.5)
    assert torch.allclose(a, b, atol=1e-6)
    assert 0 < a.item() <= math.log(2) + 1e-6
    # Written out: ½ KL(p‖m) + ½ KL(q‖m), m = ½(p + q).
    p, q = t.softmax(-1), d.softmax(-1)
    m = 0.5 * (p + q)
    ref = 0.5 * F.kl_div(m.log(), p, reduction="none").sum(-1) + 0.5 * F.kl_div(
        m.log(), q, reduction="none"
    ).sum(-1)
    assert torch.allclose(a, ref.mean(), atol=1e-5)


def test_jsd_endpoints_are_the_kl_limits():
    t, d = _logits(0), _logits(1)
    assert torch.allclose(L.jsd(t, d, beta=0.0), L.forward_kl(t, d))
    assert torch.allclose(L.jsd(t, d, beta=1.0), L.reverse_kl(t, d))
    # JSD(β)/β → KL(p‖q) as β → 0 and JSD(β)/(1−β) → KL(q‖p) as β → 1 (mild logits: the
    # next term is O(β·χ²), large for peaked distributions).
    t, d = _logits(0, scale=1.0), _logits(1, scale=1.0)
    b = 1e-4
    assert torch.allclose(L.jsd(t, d, beta=b) / b, L.forward_kl(t, d), rtol=1e-2)
    assert torch.allclose(L.jsd(t, d, beta=1 - b) / b, L.reverse_kl(t, d), rtol=1e-2)


def test_tvd_reference_and_acceptance():
    t, d = _logits(0), _logits(1)
    m = _mask()
    p, q = t.softmax(-1), d.softmax(-1)
    expected = (0.5 * (p - q).abs().sum(-1))[m].mean()
    value = L.tvd(t, d, mask=m)
    assert torch.allclose(value, expected, atol=1e-6)
    assert torch.allclose(1 - value, L.acceptance_estimate(t, d, mask=m), atol=1e-6)
    assert L.acceptance_estimate(t, t.clone()).item() == pytest.approx(1.0, abs=1e-6)


def test_target_argmax_ce_reference():
    t, d = _logits(0), _logits(1)
    expected = F.cross_entropy(d.reshape(-1, V), t.argmax(-1).reshape(-1))
    assert torch.allclose(L.target_argmax_ce(t, d), expected, atol=1e-6)


def test_data_ce_reference_and_ignore_index():
    d = _logits(1)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    labels[0, 0] = L.IGNORE_INDEX
    keep = labels != L.IGNORE_INDEX
    expected = F.cross_entropy(d[keep], labels[keep])
    assert torch.allclose(L.data_ce(d, labels), expected, atol=1e-6)
    m = _mask()
    assert torch.allclose(L.data_ce(d, labels, m), F.cross_entropy(d[m & keep], labels[m & keep]))


@pytest.mark.parametrize("name", DIVERGENCES + ["target_ce"])
def test_masked_positions_are_ignored(name):
    t, d = _logits(0), _logits(1)
    m = _mask()
    fn = L.get_loss(name)
    base = fn(t, d, mask=m)
    t2, d2 = t.clone(), d.clone()
    t2[~m] = float("nan")
    d2[~m] = 1e30
    d2[0, 4, 0] = float("inf")
    assert torch.equal(fn(t2, d2, mask=m), base)
    assert not torch.equal(fn(t, d), base)  # the mask did something


def test_float_mask_weights_positions():
    t, d = _logits(0), _logits(1)
    w = torch.zeros(B, T)
    w[0, 0], w[1, 2] = 1.0, 3.0
    per = F.kl_div(F.log_softmax(d, -1), t.softmax(-1), reduction="none").sum(-1)
    expected = (per[0, 0] + 3 * per[1, 2]) / 4
    assert torch.allclose(L.forward_kl(t, d, mask=w), expected, atol=1e-6)


def test_empty_mask_gives_zero():
    t, d = _logits(0), _logits(1).requires_grad_()
    value = L.forward_kl(t, d, mask=torch.zeros(B, T, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()


@pytest.mark.parametrize("name", DIVERGENCES + ["target_ce"])
def test_no_gradient_reaches_the_target(name):
    t = _logits(0).requires_grad_()
    d = _logits(1).requires_grad_()
    L.get_loss(name)(t, d, mask=_mask()).backward()
    assert t.grad is None
    assert d.grad is not None and d.grad.abs().sum() > 0
    assert torch.all(d.grad[~_mask()] == 0)


def test_bf16_inputs_compute_in_float32():
    t, d = _logits(0), _logits(1)
    value = L.forward_kl(t.bfloat16(), d.bfloat16())
    assert value.dtype == torch.float32
    ref = L.forward_kl(t.bfloat16().float(), d.bfloat16().float())
    assert torch.allclose(value, ref, atol=1e-6)


def test_chain_tau():
    assert L.chain_tau(1.0, 4) == 5
    assert L.chain_tau(0.0, 4) == 1
    assert L.chain_tau(0.5, 0) == 1
    assert L.chain_tau(0.5, 3) == pytest.approx((1 - 0.5**4) / (1 - 0.5))
    assert L.chain_tau(0.8, 7) == pytest.approx((1 - 0.8**8) / 0.2)
    with pytest.raises(DraftsmithError):
        L.chain_tau(0.5, -1)


def test_get_loss_names_valid_losses():
    assert L.get_loss("forward_kl") is L.forward_kl
    with pytest.raises(DraftsmithError) as err:
        L.get_loss("kl")
    for name in L.LOSSES:
        assert name in str(err.value)
    assert "'kl'" in str(err.value)


def test_bad_shapes_and_temperature_fail_clearly():
    t, d = _logits(0), _logits(1)
    with pytest.raises(DraftsmithError, match="mask"):
        L.forward_kl(t, d, mask=torch.ones(B, T + 1, dtype=torch.bool))
    with pytest.raises(DraftsmithError, match="temperature"):
        L.tvd(t, d, temperature=0.0)
    with pytest.raises(DraftsmithError, match="leading shape"):
        L.forward_kl(t, d[:, :-1])


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_each_registered_loss_is_the_mean_of_its_row_kernel(name):
    """One registry: a name's loss over logits and its per-row kernel (what a mix combines) agree."""
    torch.manual_seed(0)
    t, d = torch.randn(6, 11) * 2, torch.randn(6, 11) * 2
    labels = torch.randint(0, 11, (6,))
    loss = L.LOSSES[name]
    options = {"topk_forward_kl": {"k": 3}}.get(name, {})
    rows = loss.rows(L.Rows(t, d, labels, 1.0), **options)
    whole = loss.mean(d, labels) if name == "data_ce" else loss.mean(t, d, **options)
    assert rows.shape == (6,)
    torch.testing.assert_close(whole, rows.mean(), atol=1e-5, rtol=1e-5)
