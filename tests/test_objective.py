"""Issue 18's objectives: the acceptance losses against hand-computed values and gradients, loss mixes,
position weights (the accepted-length product rule), recipes that carry them, the kinds that apply them,
and the Muon optimizer's parameter groups and resume."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from draftsmith.distill import losses as L
from draftsmith.distill.objective import Objective, accepted_length_weights, reach_weights
from draftsmith.metric_modules.acceptance.acceptance_figures import acceptance_figures, tau_from_alphas
from draftsmith.errors import DraftsmithError
from draftsmith.models.eagle3 import Eagle3TrainModule, build_eagle3
from draftsmith.models.target import Target, target_signals
from draftsmith.train.config import load_recipe, save_resolved
from draftsmith.train.optim import MuonWithAdamW, build_optimizer, is_muon_param
from draftsmith.train.run import train

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

# a 3-token case small enough to write out: p = (0.5, 0.3, 0.2), q = softmax(z)
P = torch.tensor([0.5, 0.3, 0.2])
Z = torch.tensor([0.0, 1.0, -1.0])


def _q() -> torch.Tensor:
    return torch.softmax(Z, -1)


def _grad(fn) -> tuple[float, torch.Tensor]:
    z = Z.clone().requires_grad_(True)
    value = fn(P.log()[None], z[None])
    value.backward()
    return value.item(), z.grad


def _by_hand_dalpha() -> torch.Tensor:
    """∂α/∂z for α = Σ min(p, q): ∂α/∂q_v = 1 where q_v < p_v (0 else), through the softmax Jacobian."""
    q = _q()
    g = (q < P).float()                                      # dα/dq
    return q * (g - (g * q).sum())                           # softmax: dq_v/dz_u = q_v (δ_uv − q_u)


def test_the_three_token_case_is_what_it_says():
    q = _q()
    assert q[0] < P[0] and q[1] > P[1] and q[2] < P[2]      # the case mixes both sides of min


def test_tvd_value_and_gradient_by_hand():
    q = _q()
    alpha = float(torch.minimum(P, q).sum())
    value, grad = _grad(L.tvd)
    assert value == pytest.approx(1 - alpha, abs=1e-6)
    torch.testing.assert_close(grad, -_by_hand_dalpha(), atol=1e-6, rtol=0)


def test_nla_value_and_gradient_by_hand():
    q = _q()
    alpha = float(torch.minimum(P, q).sum())
    value, grad = _grad(L.nla)
    assert value == pytest.approx(-math.log(alpha), abs=1e-6)
    torch.testing.assert_close(grad, -_by_hand_dalpha() / alpha, atol=1e-6, rtol=0)   # TV's gradient over α


def test_lk_hybrid_value_and_gradient_by_hand():
    q = _q()
    alpha = float(torch.minimum(P, q).sum())
    lam = math.exp(-3 * alpha)                                # a constant: α is detached inside λ
    kl = float((P * (P.log() - q.log())).sum())
    value, grad = _grad(L.lk_hybrid)
    assert value == pytest.approx(lam * kl + (1 - lam) * (1 - alpha), abs=1e-6)
    d_kl = q - P                                              # ∂KL(p‖softmax z)/∂z
    torch.testing.assert_close(grad, lam * d_kl - (1 - lam) * _by_hand_dalpha(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["nla", "lk_hybrid"])
def test_acceptance_losses_are_zero_at_equal_inputs_and_masked_like_the_others(name):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7) * 3
    fn = L.get_loss(name)
    assert fn(x, x.clone()).abs().item() < 1e-5
    d = torch.randn(2, 5, 7)
    d_bad = d.clone()
    d_bad[0, 4] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 4] = False
    torch.testing.assert_close(fn(x, d_bad, mask=mask), fn(x[mask], d[mask]))


def test_nla_is_finite_without_overlap():
    t = torch.tensor([[0.0, -1e4]])
    d = torch.tensor([[-1e4, 0.0]]).requires_grad_(True)
    value = L.nla(t, d)
    value.backward()
    assert value.item() == pytest.approx(-math.log(L.NLA_FLOOR), rel=1e-3)
    assert torch.isfinite(d.grad).all()


def test_a_mix_is_the_weighted_sum_of_its_losses():
    torch.manual_seed(0)
    t, d = torch.randn(6, 9), torch.randn(6, 9)
    labels = torch.randint(0, 9, (6,))
    mix = Objective((("ce", 0.1), ("tvd", 0.9), ("data_ce", 0.5)))
    expected = 0.1 * L.target_argmax_ce(t, d) + 0.9 * L.tvd(t, d) + 0.5 * L.data_ce(d, labels)
    rows, alpha = mix.rows(t, d, labels)
    torch.testing.assert_close(rows.mean(), expected)
    torch.testing.assert_close(alpha.mean(), L.acceptance_estimate(t, d))
    assert Objective((("data_ce", 1.0),)).rows(None, d, labels)[1] is None


def test_rows_with_a_graph_recompute_their_internals_and_keep_values_and_gradients():
    torch.manual_seed(1)
    t, z = torch.randn(5, 11), torch.randn(5, 11)
    labels = torch.randint(0, 11, (5,))
    objective = Objective((("lk_hybrid", 0.7), ("ce", 0.2), ("data_ce", 0.1)))
    grads, values = [], []
    for rows in (objective.rows, objective._rows):           # checkpointed, then computed in one pass
        d = z.clone().requires_grad_()
        loss, alpha = rows(t, d, labels)
        (loss * torch.arange(1.0, 6.0)).sum().backward()
        grads.append(d.grad)
        values.append((loss.detach(), alpha))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        objective.rows(t, z.clone().requires_grad_(), labels)
    assert sum(saved) <= t.numel() + z.numel() + labels.numel()    # only the inputs wait for the backward


def test_rows_in_slices_equal_the_whole_pass_with_and_without_a_keep_mask(monkeypatch):
    """Objective.rows runs its rows in slices of CHUNK_ELEMENTS logits (one allocation size recurs on the CPU
    heap); `keep` picks the target's rows inside each slice. Same values, α and gradients as one pass."""
    from draftsmith.distill import objective as objective_module
    torch.manual_seed(2)
    grid, z = torch.randn(3, 4, 11).log_softmax(-1), torch.randn(7, 11)
    keep = torch.zeros(3, 4, dtype=torch.bool)
    keep.view(-1)[torch.tensor([0, 2, 3, 5, 8, 9, 11])] = True
    labels = torch.randint(0, 11, (7,))
    objective = Objective((("lk_hybrid", 0.9), ("ce", 0.1)))
    whole_d = z.clone().requires_grad_()
    whole, whole_alpha = objective._rows(grid[keep], whole_d, labels)
    (whole * torch.arange(1.0, 8.0)).sum().backward()
    monkeypatch.setattr(objective_module, "CHUNK_ELEMENTS", 2 * 11)             # 2 rows a slice: 4 slices
    for grad in (True, False):
        d = z.clone().requires_grad_(grad)
        loss, alpha = objective.rows(grid, d, labels, keep=keep)
        torch.testing.assert_close((loss.detach(), alpha), (whole.detach(), whole_alpha), rtol=0, atol=0)
        if grad:
            (loss * torch.arange(1.0, 8.0)).sum().backward()
            torch.testing.assert_close(d.grad, whole_d.grad, rtol=0, atol=0)
    loss, alpha = objective.rows(grid[keep], z.clone().requires_grad_(), labels)   # no mask: plain row slices
    torch.testing.assert_close(loss.detach(), whole.detach(), rtol=0, atol=0)
    empty, none = objective.rows(grid, z[:0].clone().requires_grad_(), labels[:0], keep=torch.zeros_like(keep))
    assert empty.shape == (0,) and none.shape == (0,)


def test_rows_slices_reach_the_draft_logits_through_one_split(monkeypatch):
    """The slices' gradients reach d_logits through ONE split node, never one slice node per slice: a slice's
    backward writes a zeroed copy of the whole of d_logits (at PARD's 2,560 x 49,152 logits that made a
    forward + backward 15x slower: bench/objective_rows.py)."""
    from draftsmith.distill import objective as objective_module
    monkeypatch.setattr(objective_module, "CHUNK_ELEMENTS", 2 * 11)             # 2 rows a slice: 4 slices
    d = torch.randn(7, 11, requires_grad=True)
    loss, _ = Objective().rows(torch.randn(7, 11).log_softmax(-1), d)
    into_d, seen, todo = set(), set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and getattr(nxt, "variable", None) is d:
                into_d.add(node.name())
            todo.append(nxt)
    assert into_d == {"SplitBackward0"}


def test_objective_from_config_folds_data_ce_weight_into_the_mix():
    cfg = load_recipe("smollm2-135m/parallel-kd-quick")          # forward_kl + 0.1 data_ce
    assert Objective.from_config(cfg.loss).mix == (("forward_kl", 1.0), ("data_ce", 0.1))
    cfg = load_recipe("smollm2-135m/parallel-kd-quick", ['loss.mix={"ce": 0.1, "tvd": 0.9}', "loss.data_ce_weight=0"])
    assert Objective.from_config(cfg.loss).mix == (("ce", 0.1), ("tvd", 0.9))
    assert not Objective((("data_ce", 1.0),)).needs_target
    assert Objective((("data_ce", 1.0),), position_weights="reach").needs_target


# ------------------------------------------------------------------------------------ position weights

def test_accepted_length_weights_are_the_gradient_of_the_tau_from_alphas():
    """The product rule: Σ_i w_i·∇α_i = ∇τ, τ = 1 + Σ_i Π_{j≤i} α_j — so Σ_i w_i·(1 − α_i) trains τ itself."""
    alpha = torch.tensor([0.8, 0.6, 0.5, 0.3], requires_grad=True)
    tau = 1 + torch.cumprod(alpha, 0).sum()
    (grad,) = torch.autograd.grad(tau, alpha)
    w = accepted_length_weights(alpha)
    torch.testing.assert_close(w, grad)
    a = [0.8, 0.6, 0.5, 0.3]       # by hand: w_0 = 1 + α1 + α1α2 + α1α2α3; w_3 = α0α1α2
    assert float(w[0]) == pytest.approx(1 + a[1] + a[1] * a[2] + a[1] * a[2] * a[3])
    assert float(w[3]) == pytest.approx(a[0] * a[1] * a[2])
    assert tau_from_alphas(a) == pytest.approx(float(tau))
    grid = torch.rand(4, 2, 3)                                # per row: the rule holds column by column
    torch.testing.assert_close(accepted_length_weights(grid)[:, 1, 2], accepted_length_weights(grid[:, 1, 2]))


def test_exp_decay_reach_and_kind_default():
    ob = Objective(position_weights="exp_decay", gamma=2.0)
    torch.testing.assert_close(ob.along(3), torch.tensor([1.0, math.exp(-0.5), math.exp(-1.0)]))
    default = torch.tensor([1.0, 0.8, 0.64])
    assert torch.equal(Objective().along(3, default), default)
    assert torch.equal(Objective(position_weights="uniform").along(3, default), torch.ones(3))
    gold = torch.tensor([[0.5, 0.4, 0.9, 0.2]])
    w = reach_weights(gold, 3)
    torch.testing.assert_close(w[2, 0], torch.tensor([0.5 * 0.4, 0.4 * 0.9, 0.0, 0.0]))
    with pytest.raises(DraftsmithError, match="reach weights need"):
        Objective(position_weights="reach").along(3)
    with pytest.raises(DraftsmithError, match="accepted_length"):
        Objective(position_weights="accepted_length").along(3)


# ------------------------------------------------------------------------------------ a kind applies them

@pytest.fixture(scope="module")
def eagle3_case():
    torch.manual_seed(0)
    target = Target(tiny_llama(0, layers=4).eval(), tokenizer=None)
    ids = torch.randint(3, 200, (2, 12))
    attention = torch.ones_like(ids)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[:, 0] = False
    layers = (0, 1, 3)
    t_logits, hidden = target_signals(target.model, ids, attention, mask, layers)
    head = build_eagle3(target.model, list(layers), torch.arange(0, 256, 2)).float()
    return target, head, (ids, attention, mask, hidden, t_logits)


def _ttt_loss(case, objective, decay=0.8):
    target, head, inputs = case
    module = Eagle3TrainModule(head, target.model, ttt_steps=3, decay=decay, objective=objective)
    return module(*inputs)[1], module


def test_eagle3_exp_decay_at_the_matching_gamma_is_its_default(eagle3_case):
    default, _ = _ttt_loss(eagle3_case, Objective())
    same, _ = _ttt_loss(eagle3_case, Objective(position_weights="exp_decay", gamma=-1 / math.log(0.8)))
    uniform, _ = _ttt_loss(eagle3_case, Objective(position_weights="uniform"))
    torch.testing.assert_close(same, default)
    assert float(uniform) > float(default) + 1e-4


def test_eagle3_accepted_length_weights_shrink_later_steps_and_log_alpha(eagle3_case):
    """tvd with accepted_length weights (each row's own α of every step, test above for the rule): below the
    uniform loss, since at small α the later steps weigh Π α << 1; the log's α per step and implied τ agree."""
    objective = Objective((("tvd", 1.0),), position_weights="accepted_length")
    loss, module = _ttt_loss(eagle3_case, objective)
    uniform, _ = _ttt_loss(eagle3_case, Objective((("tvd", 1.0),), position_weights="uniform"))
    stats = module.train_stats
    assert set(stats) == {"alpha_pos0", "alpha_pos1", "alpha_pos2", "tau_implied"}
    assert 0 < float(loss) < float(uniform)
    assert stats["tau_implied"] == pytest.approx(tau_from_alphas([stats[f"alpha_pos{i}"] for i in range(3)]))


def test_eagle3_reach_weights_need_and_use_the_target(eagle3_case):
    reach, _ = _ttt_loss(eagle3_case, Objective(position_weights="reach"))
    uniform, _ = _ttt_loss(eagle3_case, Objective(position_weights="uniform"))
    assert float(reach) < float(uniform)               # later steps weigh Π p(gold) < 1


# ------------------------------------------------------------------------------------ recipes

def test_a_recipe_with_a_loss_mapping_round_trips(tmp_path):
    cfg = load_recipe("smollm2-135m/eagle3-ttt-quick",
                      ["loss.mix={ce: 0.1, tvd: 0.9}", "loss.position_weights=exp_decay", "loss.gamma=3",
                       "train.optimizer=muon", "train.muon_lr=0.01"])
    path = save_resolved(cfg, tmp_path)
    again = load_recipe(path)
    assert again.loss.mix == {"ce": 0.1, "tvd": 0.9} and again.loss.position_weights == "exp_decay"
    assert (again.loss.gamma, again.train.optimizer, again.train.muon_lr) == (3.0, "muon", 0.01)
    assert yaml.safe_load(path.read_text())["loss"]["mix"] == {"ce": 0.1, "tvd": 0.9}


@pytest.mark.parametrize("override, match", [
    ("loss.mix={kl: 1}", "loss.mix key"),
    ("loss.mix={tvd: -1}", "loss.mix.tvd"),
    ("loss.mix={tvd: 0}", "at least one weight"),
    ("loss.mix={}", "loss.mix"),
    ("loss.mix=[tvd]", "loss.mix must be a mapping"),
    ("loss.position_weights=linear", "loss.position_weights"),
    ("loss.gamma=0", "loss.gamma"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("drafter.cat=true", "unknown key"),
])
def test_bad_objective_settings_fail_clearly(override, match):
    with pytest.raises(DraftsmithError, match=match):
        load_recipe("smollm2-135m/eagle3-ttt-quick", [override])


def test_accepted_length_without_a_target_is_refused():
    with pytest.raises(DraftsmithError, match="accepted_length"):
        load_recipe("smollm2-135m/parallel-kd-quick",
                    ["loss.name=data_ce", "loss.data_ce_weight=0", "loss.position_weights=accepted_length"])


# ------------------------------------------------------------------------------------ Muon

def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(eagle3_case):
    _, head, _ = eagle3_case
    t = load_recipe("smollm2-135m/eagle3-ttt-quick", ["train.optimizer=muon"]).train
    opt = build_optimizer(head, t)
    assert isinstance(opt, MuonWithAdamW)
    muon, adamw = opt.parts
    names = {id(p): n for n, p in head.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    in_adamw = sorted(names[id(p)] for g in adamw.param_groups for p in g["params"])
    assert in_muon == sorted(["fc.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
                              "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight",
                              "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
                              "layers.0.mlp.down_proj.weight"])
    assert "lm_head.weight" in in_adamw and all("norm" in n or n == "lm_head.weight" for n in in_adamw)
    assert [g["lr"] for g in muon.param_groups] == [t.muon_lr]
    assert {g["lr"] for g in adamw.param_groups} == {t.lr}
    assert not is_muon_param("model.embed_tokens.weight", torch.zeros(4, 4))
    assert type(build_optimizer(head, load_recipe("smollm2-135m/eagle3-ttt-quick").train)) is torch.optim.AdamW


def test_muon_schedule_scales_both_and_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, tiny_setup):
    common = [f"run.out_dir={tmp_path}", "train.optimizer=muon", "train.muon_lr=0.01", "checkpoint.every=2"]
    train(str(tiny_setup), [*common, "run.name=whole", "train.max_steps=4"])
    train(str(tiny_setup), [*common, "run.name=split", "train.max_steps=2"])
    train(str(tiny_setup), [*common, "run.name=split", "train.max_steps=4"], resume=True)
    from safetensors.torch import load_file
    a = load_file(tmp_path / "whole" / "checkpoints" / "step-0000004" / "drafter" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step-0000004" / "drafter" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "whole" / "checkpoints" / "step-0000004" / "state" / "trainer.json").read_text())
    assert set(state["optimizer"]) == {"muon", "adamw"}
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "loss" in x]
    assert all("alpha_pos0" in x and "tau_implied" in x for x in logged)   # the training log's α and τ


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> Path:
    """A tiny eagle3 recipe over a tiny Llama target and a few chats (tests/test_training.py's pattern)."""
    import random

    from tiny import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("objective")
    tok = make_tiny_tokenizer()
    target = tiny_llama(0, layers=4, vocab=len(tok))
    target.config.eos_token_id = tok.eos_token_id
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    rng = random.Random(0)
    words = "the a cat dog runs fast red blue answer question capital France Paris number help".split()
    with open(root / "chats.jsonl", "w") as f:
        for _ in range(30):
            messages = [{"role": r, "content": " ".join(rng.choices(words, k=rng.randint(4, 10)))}
                        for r in ("user", "assistant", "user", "assistant")]
            f.write(json.dumps({"messages": messages}) + "\n")
    recipe = {
        "description": "tiny eagle3 objective test recipe",
        "target": {"name": str(root / "target"), "dtype": "fp32"},
        "drafter": {"kind": "eagle3", "num_layers": 1, "draft_vocab_size": 64, "ttt_steps": 3},
        "data": {"source": str(root / "chats.jsonl"), "max_length": 48, "heldout_fraction": 0.2,
                 "cache_dir": str(root / "cache")},
        "loss": {"name": "lk_hybrid", "position_weights": "accepted_length"},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "mixed_precision": "no"},
        "eval": {"every": 2, "batches": 1},
        "checkpoint": {"every": 2, "keep": 3},
        "log": {"every": 1, "tensorboard": False},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_the_trainers_tau_is_the_eval_reports_tau_of_a_fixed_chain():
    """One definition: τ from α per position (training log, held-out prediction) equals the pooled τ the
    eval report measures from per-step counts, for a fixed-k chain without EOS."""
    accepted = [[0, 3, 1, 2, 0, 3], [1, 1, 0, 2]]
    figures = acceptance_figures(accepted, [[3] * len(a) for a in accepted], k=3)
    assert tau_from_alphas(figures["acceptance_by_position"]) == pytest.approx(figures["tau"])
    assert L.chain_tau(0.5, 3) == pytest.approx(tau_from_alphas([0.5, 0.5, 0.5])) == pytest.approx(1.875)
    assert tau_from_alphas([0.5, None, 0.9]) == 1.5
