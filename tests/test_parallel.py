"""Kind `parallel` (PARD): lossless in the built-in decoder with ONE drafter forward per verify step,
exact q per drafted position, the training layout = what drafting sees, COD's shares and nesting,
CAT's weights, training lowers the loss (target-KD and target-independent modes), and the mask
token survives train -> export --format hf -> load_drafter -> eval."""

import copy
import json
import types

import pytest
import torch
from safetensors.torch import load_file

from draftsmith.distill.objective import Objective, reach_weights
from draftsmith.errors import DraftsmithError
from draftsmith.eval.decoder import autoregressive_generate, make_sampler, speculative_generate
from draftsmith.models.mask_blocks import cod_fractions, cod_keep, valid_anchors
from draftsmith.models.parallel import ParallelProposer, build_parallel
from draftsmith.models.parallel_train import ParallelTrainModule
from draftsmith.models.target import Target
from draftsmith.protocol.proposer import DecodeState
from draftsmith.protocol.sampling import Sampling, warp
from draftsmith.train import steps
from draftsmith.train.config import load_recipe

from conftest import VOCAB, perturbed, prompts, tiny_llama
from test_verify import law_of_verify_sampling
from tiny import make_tiny_tokenizer

KD = Objective((("forward_kl", 1.0), ("data_ce", 0.1)))
CAT = Objective((("forward_kl", 1.0), ("data_ce", 0.1)), position_weights="reach")
CE = Objective((("data_ce", 1.0),))


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """tmp/{target/ (tiny Llama + tokenizer), chats.jsonl, bench.jsonl, recipe.yaml (kind parallel)}."""
    import random

    import yaml

    root = tmp_path_factory.mktemp("parallel")
    tok = make_tiny_tokenizer()
    target = tiny_llama(0, layers=2, vocab=len(tok))
    target.config.eos_token_id = tok.eos_token_id
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    rng = random.Random(0)
    words = "the a cat dog runs fast red blue answer question capital France Paris number help you".split()
    with open(root / "chats.jsonl", "w") as f:
        for _ in range(40):
            turns = [{"role": ("user", "assistant")[i % 2], "content": " ".join(rng.choices(words, k=rng.randint(3, 10)))}
                     for i in range(rng.randint(2, 4))]
            f.write(json.dumps({"messages": turns}) + "\n")
    (root / "bench.jsonl").write_text('{"prompt": "What is the capital of France?"}\n')
    recipe = {
        "description": "tiny parallel recipe",
        "target": {"name": str(root / "target"), "dtype": "fp32"},
        "drafter": {"kind": "parallel", "num_layers": 1, "init": "target", "parallel_k": 3},
        "data": {"source": str(root / "chats.jsonl"), "max_length": 64, "heldout_fraction": 0.2,
                 "cache_dir": str(root / "cache")},
        "loss": {"name": "forward_kl", "data_ce_weight": 0.1},
        "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "mixed_precision": "no"},
        "eval": {"every": 3, "batches": 2},
        "checkpoint": {"every": 3, "keep": 2},
        "log": {"every": 1, "tensorboard": False},
        "run": {"out_dir": str(root / "runs")},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root


def drafter_spec(**over):
    spec = dict(init_from=None, num_layers=2, hidden_size=None, intermediate_size=None, init="target",
                layers_from_target=[0, 3], parallel_k=4)
    return types.SimpleNamespace(**{**spec, **over})


def parallel_model(target, seed=0, scale=0.02):
    return perturbed(build_parallel(target.model, drafter_spec()), seed, scale)


def batch(n=4, length=24, seed=1, prompt=5):
    ids = torch.tensor(prompts(n, length=length, seed=seed))
    attention = torch.ones_like(ids)
    attention[0, length - 4:] = 0                         # one right-padded row
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[:, :prompt] = False
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


# ------------------------------------------------------------------------------------ decoding

def test_mask_token_is_a_new_row_and_drafts_stay_in_the_target_vocabulary(target4):
    model = build_parallel(target4.model, drafter_spec())
    c = model.config
    assert (c.draftsmith_kind, c.draftsmith_mask_token_id, c.pard_token, c.draftsmith_target_vocab_size) == \
        ("parallel", VOCAB, VOCAB, VOCAB)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == VOCAB + 1
    torch.testing.assert_close(emb[VOCAB], target4.model.get_input_embeddings().weight.mean(0))
    seen = []

    class Spy(ParallelProposer):
        def propose(self, state, k, sampler):
            draft = super().propose(state, k, sampler)
            seen.extend(draft.tokens)
            return draft

    speculative_generate(target4, Spy(model), prompts(1)[0], k=4, max_new_tokens=20)
    assert seen and max(seen) < VOCAB


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8])
def test_greedy_equality(target4, k):
    proposer = ParallelProposer(parallel_model(target4))
    for prompt in prompts(3, seed=k):
        ar = autoregressive_generate(target4, prompt, max_new_tokens=24)
        assert speculative_generate(target4, proposer, prompt, k=k, max_new_tokens=24).tokens == ar.tokens


def test_one_drafter_forward_per_verify_step(target4):
    model = parallel_model(target4)
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append(1))
    sd = speculative_generate(target4, ParallelProposer(model), prompts(1)[0], k=4, max_new_tokens=40)
    drafted = [n for n in sd.proposed if n > 0]
    assert len(drafted) >= 8 and len(calls) == len(drafted)


@pytest.mark.parametrize("spec", ["dynamic:4,3,12", "static"])
def test_trees_cost_one_drafter_forward_and_stay_lossless(target4, spec, tmp_path):
    """Every depth of a tree takes its children from one position of the single forward (Medusa-style)."""
    from draftsmith.protocol.drafting import TreeShape

    if spec == "static":
        (tmp_path / "t.json").write_text(json.dumps([[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 0, 0, 0]]))
        spec = f"static:{tmp_path / 't.json'}"
    tree = TreeShape.parse(spec)
    model = parallel_model(target4)
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append(1))
    for prompt in prompts(2, seed=3):
        ar = autoregressive_generate(target4, prompt, max_new_tokens=30)
        before = len(calls)
        sd = speculative_generate(target4, ParallelProposer(model), prompt, k=4, tree=tree, max_new_tokens=30)
        assert sd.tokens == ar.tokens
        assert len(calls) - before == sum(1 for n in sd.proposed if n > 0)
        assert max(sd.proposed) > max(sd.depth)       # it did branch


def test_drafts_equal_a_fresh_forward_and_leave_no_mask_in_the_cache(target4):
    """Each draft i is the argmax at row i of [committed..., mask x (k-1)] run from scratch, and the
    cache holds exactly the committed tokens afterwards."""
    model = parallel_model(target4)
    proposer = ParallelProposer(model)
    proposer.reset()
    prompt = prompts(1, length=10)[0]
    sampler = make_sampler(Sampling(), None)
    for step, extra in enumerate([[], [7, 9], [11]]):
        tokens = prompt + extra
        draft = proposer.propose(DecodeState(tokens=tokens, committed=len(tokens) - 1, hidden=[], hidden_start=0),
                                 4, sampler)
        ids = torch.tensor([tokens + [VOCAB] * 3])
        with torch.no_grad():
            fresh = model(input_ids=ids).logits[0, -4:, :VOCAB]
        assert draft.tokens == fresh.argmax(-1).tolist(), step
        assert proposer.cache.get_seq_length() == len(tokens) and proposer.fed == tokens


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=20)])
def test_q_per_drafted_position_and_exact_law(target4, sampling):
    model = parallel_model(target4)
    proposer = ParallelProposer(model)
    proposer.reset()
    prompt = prompts(1)[0]
    state = DecodeState(tokens=list(prompt), committed=len(prompt) - 1, hidden=[], hidden_start=0)
    draft = proposer.propose(state, 3, make_sampler(sampling, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + [VOCAB] * 2])).logits[0, -3:, :VOCAB]
    assert draft.q.shape == (3, VOCAB)
    for i in range(3):
        torch.testing.assert_close(draft.q[i], warp(logits[i], sampling))
        assert draft.q[i, draft.tokens[i]] > 0
    cache = target4.new_cache()
    target4.forward(prompt[:-1], cache)
    p = warp(target4.forward([prompt[-1]], cache).logits[-1], sampling)
    torch.testing.assert_close(law_of_verify_sampling(p, draft.q[0]), p, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ training

def test_training_layout_sees_what_drafting_sees(target4):
    """With every element kept, the logits of element (d, a) in the one training forward equal the
    drafter's logits at mask d after committing x_0..x_a."""
    model = parallel_model(target4)
    module = ParallelTrainModule(copy.deepcopy(model), CE, k=4, cod_ratio=1.0, cod_floor=1.0).eval()
    b = batch(n=2, length=16, prompt=1)
    mask = b["loss_mask"][:, 1:] & b["attention_mask"][:, 1:].bool()
    blocks = module._blocks(mask)
    captured, head = [], module._head
    module._head = lambda h: captured.append(head(h)) or captured[-1]       # every row's logits
    with torch.no_grad():
        module(b["input_ids"], b["attention_mask"], mask)
    train_logits = captured[0]                                                  # [N0 + Ne, V]
    n0 = int(mask.sum())
    depth, anchor = blocks.depth[blocks.real], blocks.anchor[blocks.real]
    batch_of = torch.arange(2)[:, None].expand_as(blocks.depth)[blocks.real]
    assert set(depth.tolist()) == {1, 2, 3}
    checked = 0
    for e in range(len(depth)):
        bi, d, a = int(batch_of[e]), int(depth[e]), int(anchor[e])
        if a not in (0, 4, 9):
            continue
        ids = b["input_ids"][bi, : a + 1].tolist() + [VOCAB] * d
        with torch.no_grad():
            fresh = model(input_ids=torch.tensor([ids])).logits[0, -1, :VOCAB]
        torch.testing.assert_close(train_logits[n0 + e], fresh, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked >= 12


def test_cod_keeps_all_of_depth_0_and_the_stated_share_of_each_depth():
    torch.manual_seed(0)
    mask = torch.ones(2, 20000, dtype=torch.bool)
    mask[:, 100:110] = False                             # an untrained gap: no element may cross it
    valid = valid_anchors(mask, 6)
    fractions = cod_fractions(6, 0.7, 0.2)
    assert fractions == pytest.approx([1, 0.7, 0.49, 0.343, 0.2401, 0.2])
    kept = cod_keep(valid, fractions)
    for d in range(1, 6):
        share = float(kept[d - 1].sum()) / float(valid[d].sum())
        assert share == pytest.approx(fractions[d], abs=0.01), d
        assert not bool((kept[d - 1] & ~valid[d]).any())
        if d > 1:                                         # nested: an element keeps its shallower masks
            assert not bool((kept[d - 1] & ~kept[d - 2]).any())
    assert not valid[1][:, 99].any() and valid[1][:, 98].all() and not valid[3][:, 97].any()


def test_reach_weights_are_the_target_chance_of_reaching_a_depth():
    torch.manual_seed(0)
    t_logits = torch.randn(6, 10)
    labels = torch.randint(0, 10, (6,))
    gold = torch.softmax(t_logits, -1)[torch.arange(6), labels]
    w = reach_weights(gold[None], 3)
    assert torch.equal(w[0], torch.ones(1, 6))
    torch.testing.assert_close(w[1][0, :5], gold[:5])
    torch.testing.assert_close(w[2][0, :4], gold[:4] * gold[1:5])
    assert float(w[2][0, 5]) == 0


@pytest.mark.parametrize("loss_cfg", [KD, CAT, CE], ids=["kd", "kd-cat", "ce"])
def test_training_lowers_the_loss(target4, loss_cfg, monkeypatch):
    torch.manual_seed(0)
    module = ParallelTrainModule(parallel_model(target4).float(), loss_cfg, 4, 0.7, 0.2)
    target_calls = []
    real = steps.target_signals
    monkeypatch.setattr(steps, "target_signals", lambda *a, **kw: target_calls.append(1) or real(*a, **kw))
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    b = batch()
    losses = []
    for _ in range(25):
        loss, _, _ = steps.forward_batch(target4.model, module, b, loss_cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # target-independent mode (PARD): CE on the data, no target forward while training
    assert len(target_calls) == (0 if loss_cfg is CE else 25)
    module.eval()
    with torch.no_grad():
        _, t_logits, d_logits = steps.forward_batch(target4.model, module, b, loss_cfg)
    assert t_logits is not None and d_logits.shape == t_logits.shape
    assert {"parallel_greedy_match_depth3", "parallel_tau_greedy_k4"} <= set(module.step_stats)


def test_frozen_embeddings_train_the_mask_row_only(target4):
    model = parallel_model(target4).float()
    before = model.get_input_embeddings().weight.detach().clone()
    module = ParallelTrainModule(model, KD, 4, 0.7, 0.2, freeze_embeddings=True)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        loss, _, _ = steps.forward_batch(target4.model, module, batch(), KD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.get_input_embeddings().weight.detach()
    assert torch.equal(after[:VOCAB], before[:VOCAB]) and not torch.equal(after[VOCAB], before[VOCAB])
    assert not model.lm_head.weight.requires_grad


# ------------------------------------------------------------------------------------ end to end

def test_train_export_load_and_eval(setup, tmp_path, capsys):
    from draftsmith.cli import main
    from draftsmith.models import load_drafter, load_target

    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=par",
                 "drafter.freeze_embeddings=true", "loss.position_weights=reach"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "par" / "metrics.jsonl").read_text().splitlines()]
    assert any("parallel_greedy_match_depth2" in x for x in lines)
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "par"), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    vocab = config["draftsmith_target_vocab_size"]
    assert (config["draftsmith_kind"], config["draftsmith_mask_token_id"], config["pard_token"]) == \
        ("parallel", vocab, vocab)
    weights = load_file(out / "model.safetensors")
    target_weights = load_file(setup / "target" / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    assert embed.shape[0] == vocab + 1                    # the trained mask row travels with the drafter
    assert torch.equal(embed[:vocab], target_weights["model.embed_tokens.weight"])
    target = load_target(str(setup / "target"), "fp32", device="cpu")
    proposer = load_drafter(str(out), target)
    assert isinstance(proposer, ParallelProposer) and proposer.mask_id == vocab
    assert torch.equal(proposer.model.get_input_embeddings().weight[vocab], embed[vocab])
    assert main(["eval", "--target", str(setup / "target"), "--drafter", str(out), "--bench",
                 str(setup / "bench.jsonl"), "--max-new-tokens", "16", "--k", "3", "--device", "cpu",
                 "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["lossless_match_rate"] == 1.0


def test_parallel_recipes_load_with_pard_settings():
    from draftsmith.train.config import load_recipe

    quick = load_recipe("smollm2-135m/parallel-kd-quick")
    d = quick.drafter
    assert (d.kind, d.parallel_k, d.cod_ratio, d.cod_floor, d.freeze_embeddings) == ("parallel", 4, 0.7, 0.2, True)
    # the same token budget as the other quick recipes, whatever the wall clock
    assert (quick.train.max_steps, quick.train.batch_size, quick.data.max_length, quick.train.max_minutes) == \
        (532, 4, 256, None)
    assert quick.train.weight_decay == 0.0 and quick.loss.data_ce_weight == 0.1
    cluster = load_recipe("llama-3.1-8b/parallel-kd-8gpu")
    assert cluster.drafter.init_from == "meta-llama/Llama-3.2-1B-Instruct" and cluster.drafter.parallel_k == 8


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_fp32_greedy_equality_and_bf16_training():
    """On CUDA: the proposer stays lossless in fp32, and bf16 autocast training (SDPA with the 4-D
    block mask) lowers the loss."""
    target = Target(tiny_llama(0, layers=4).cuda(), tokenizer=None)
    proposer = ParallelProposer(parallel_model(target).cuda())
    for prompt in prompts(3, seed=2):
        ar = autoregressive_generate(target, prompt, max_new_tokens=24)
        assert speculative_generate(target, proposer, prompt, k=4, max_new_tokens=24).tokens == ar.tokens
    torch.manual_seed(0)
    module = ParallelTrainModule(parallel_model(target).float().cuda(), CAT, 4, 0.7, 0.2)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    b = {k: v.cuda() for k, v in batch().items()}
    losses = []
    for _ in range(25):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = steps.forward_batch(target.model, module, b, KD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("k", [1, 65, 1000])
def test_parallel_k_outside_2_to_64_is_refused(k):
    with pytest.raises(DraftsmithError, match="drafter.parallel_k"):
        load_recipe("smollm2-135m/parallel-kd-quick", [f"drafter.parallel_k={k}"])
