"""Kind `eagle3` with `parallel: true` (P-EAGLE): lossless in the built-in decoder (chains and trees) with
ONE head forward per verify step, exact q per drafted position, drafts = a fresh forward with no mask
left in the cache, the training layout = what drafting sees, the loss falls, the mask-token rule, the
speculators `peagle` export (names, shapes, config fields as docs/formats.md describes them) reads back
into identical drafts, and train -> resume -> export -> eval through the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftsmith.bench.decode_profile import count_drafter_forwards
from draftsmith.distill.objective import Objective
from draftsmith.errors import DraftsmithError
from draftsmith.eval.decoder import autoregressive_generate, make_sampler, speculative_generate
from draftsmith.models.layers import target_parts
from draftsmith.models.eagle3 import build_eagle3
from draftsmith.models.layers import default_aux_layers
from draftsmith.models.formats import read_head_folder, write_sglang, write_speculators
from draftsmith.models.peagle import PEagleHead, PEagleProposer, PEagleTrainModule
from draftsmith.models.mask_token import choose_mask_token
from draftsmith.protocol.drafting import TreeShape
from draftsmith.protocol.proposer import DecodeState
from draftsmith.protocol.sampling import Sampling, warp
from draftsmith.train import steps

from conftest import VOCAB, perturbed, prompts
from test_formats_peers import speculators_eagle3_tensors
from test_parallel import setup  # noqa: F401  (the tiny saved target, chats and recipe)
from test_training import assert_same_checkpoint, ckpt_path
from test_verify import law_of_verify_sampling

MASK = 7


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


def peagle_head(target, seed=0, k=4, draft_vocab=160, aux_layers=None) -> PEagleHead:
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
    layers = aux_layers or default_aux_layers(target.num_layers)
    head = build_eagle3(target.model, list(layers), ids)
    return perturbed(PEagleHead.from_eagle3(head, target_parts(target.model)[0], k, MASK), seed).eval()


def fresh_logits(head, target, tokens, k):
    """The head's draft logits [k, Vd] from scratch: rows 0..n-1 (taps at t, token t+1) then k-1 masks."""
    n = len(tokens) - 1
    out = target.forward(tokens[:-1], target.new_cache(), hidden_layers=tuple(head.config.aux_layers))
    embed = target_parts(target.model)[0]
    ids = torch.tensor([tokens[1:] + [MASK] * (k - 1)])
    feats = torch.cat([head.fuse([h[None] for h in out.hidden])[0], head.mask_feature().expand(k - 1, -1)])
    pos = torch.tensor([list(range(n)) + [n - 1 + d for d in range(1, k)]])
    with torch.no_grad():
        f = head(head.embed(ids, embed), feats[None], pos)[0]
    return head.logits(f[n - 1:])


# ------------------------------------------------------------------------------------ decoding

@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_greedy_equality_with_one_head_forward_per_step(target4, k):
    proposer = PEagleProposer(peagle_head(target4), target4.model)
    forwards = count_drafter_forwards(proposer, target4)       # what bench/decode_profile.py reports
    for prompt in prompts(3, seed=k):
        ar = autoregressive_generate(target4, prompt, max_new_tokens=24)
        before = forwards[0]
        sd = speculative_generate(target4, proposer, prompt, k=k, max_new_tokens=24)
        assert sd.tokens == ar.tokens
        assert forwards[0] - before == sum(1 for n in sd.proposed if n > 0)
        assert max(sd.proposed) == min(k, 4)            # never deeper than the trained depths


def test_drafts_equal_a_fresh_forward_and_leave_no_mask_in_the_cache(target4):
    """Each step's drafts are the argmax at each depth of the head run from scratch over the committed
    rows and k-1 masks, and the head's cache holds exactly the committed rows afterwards."""
    head = peagle_head(target4)
    proposer = PEagleProposer(head, target4.model)
    proposer.reset()
    prompt = prompts(1, length=10)[0]
    sampler = make_sampler(Sampling(), None)
    cache = target4.new_cache()
    out = target4.forward(prompt[:-1], cache, hidden_layers=proposer.hidden_layers)
    tokens = list(prompt)
    proposer.observe(DecodeState(tokens=tokens, committed=len(tokens) - 1, hidden=out.hidden, hidden_start=0))
    for step, extra in enumerate([[9, 11], [13], []]):
        draft = proposer.propose(DecodeState(tokens=tokens, committed=len(tokens) - 1, hidden=[], hidden_start=0),
                                 4, sampler)
        want = head.draft_ids[fresh_logits(head, target4, tokens, 4).argmax(-1)].tolist()
        assert draft.tokens == want, step
        assert proposer.length == len(tokens) - 1 and proposer.cache[0].shape[2] == len(tokens) - 1   # no mask row
        if not extra:
            break
        start = len(tokens) - 1                          # the target reads the newest token and the extra ones
        new = target4.forward(tokens[start:] + extra[:-1], cache, hidden_layers=proposer.hidden_layers)
        tokens += extra
        proposer.observe(DecodeState(tokens=tokens, committed=len(tokens) - 1, hidden=new.hidden, hidden_start=start))


@pytest.mark.parametrize("spec", ["dynamic:4,3,12", "static"])
def test_trees_cost_one_head_forward_and_stay_lossless(target4, spec, tmp_path):
    if spec == "static":
        (tmp_path / "t.json").write_text(json.dumps([[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 0, 0, 0]]))
        spec = f"static:{tmp_path / 't.json'}"
    proposer = PEagleProposer(peagle_head(target4), target4.model)
    forwards = count_drafter_forwards(proposer, target4)
    for prompt in prompts(2, seed=3):
        ar = autoregressive_generate(target4, prompt, max_new_tokens=30)
        before = forwards[0]
        sd = speculative_generate(target4, proposer, prompt, k=4, tree=TreeShape.parse(spec), max_new_tokens=30)
        assert sd.tokens == ar.tokens
        assert forwards[0] - before == sum(1 for n in sd.proposed if n > 0)
        assert max(sd.proposed) > max(sd.depth)           # it did branch


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=20)])
def test_q_per_drafted_position_and_exact_law(target4, sampling):
    head = peagle_head(target4, draft_vocab=60)
    proposer = PEagleProposer(head, target4.model)
    proposer.reset()
    prompt = prompts(1)[0]
    cache = target4.new_cache()
    out = target4.forward(prompt[:-1], cache, hidden_layers=proposer.hidden_layers)
    state = DecodeState(tokens=list(prompt), committed=len(prompt) - 1, hidden=out.hidden, hidden_start=0)
    proposer.observe(state)
    draft = proposer.propose(state, 3, make_sampler(sampling, torch.Generator().manual_seed(0)))
    assert draft.q.shape == (3, VOCAB) and bool((draft.q[:, ~head.t2d] == 0).all())
    fresh = fresh_logits(head, target4, list(prompt), 3)
    for i in range(3):
        full = torch.full((VOCAB,), float("-inf"))
        full[head.draft_ids] = fresh[i]
        torch.testing.assert_close(draft.q[i], warp(full, sampling), rtol=1e-5, atol=1e-6)
        assert draft.q[i, draft.tokens[i]] > 0
    p = warp(target4.forward([prompt[-1]], cache).logits[-1], sampling)
    torch.testing.assert_close(law_of_verify_sampling(p, draft.q[0]), p, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ training

def batch(target, module, n=3, length=20, seed=1):
    ids = torch.tensor(prompts(n, length=length, seed=seed))
    ids[1, 6] = MASK                                       # the mask id as a real token embeds as the mask too
    attention = torch.ones_like(ids)
    attention[0, length - 4:] = 0
    mask = torch.ones(n, length - 1, dtype=torch.bool) & attention[:, 1:].bool()
    mask[:, :3] = False
    t_logits, hidden = steps.target_signals(target.model, ids, attention, mask, module.target_layers)
    return ids, attention, mask, hidden, t_logits


def test_training_layout_sees_what_drafting_sees(target4):
    """With every element kept, the logits of element (d, a) in the one training forward equal the
    proposer's logits at depth d after committing the data up to row a."""
    head = peagle_head(target4)
    module = PEagleTrainModule(head, target4.model, cod_ratio=1.0, cod_floor=1.0, objective=Objective()).eval()
    ids, attention, mask, hidden, t_logits = batch(target4, module)
    captured = []
    real_logits = head.logits
    head.logits = lambda f: captured.append(real_logits(f)) or captured[-1]
    with torch.no_grad():
        module(ids, attention, mask, hidden, t_logits)
    del head.logits
    train = captured[0]                                    # [N0 + Ne, Vd]: depth-0 rows, then the elements
    trained = torch.cat([mask[:, 1:], torch.zeros(3, 1, dtype=torch.bool)], 1)
    n0 = int(trained.sum())
    checked = 0
    e = n0
    rows = trained.shape[1]
    for b in range(3):                                    # elements: batch row, then depth, then anchor
        for d in (1, 2, 3):
            for a in range(rows):
                if a + d >= rows or not trained[b, a: a + d + 1].all():
                    continue
                if a in (3, 6, 9):
                    fresh = fresh_logits(head, target4, ids[b, : a + 2].tolist(), d + 1)[d]
                    torch.testing.assert_close(train[e], fresh, rtol=1e-4, atol=1e-4)
                    checked += 1
                e += 1
    assert e == train.shape[0] and checked >= 18


def test_training_lowers_the_loss_and_logs_depths(target4):
    torch.manual_seed(0)
    head = peagle_head(target4).float().train()
    module = PEagleTrainModule(head, target4.model, 0.7, 0.2, Objective())
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    data = batch(target4, module)
    losses = []
    for _ in range(25):
        _, loss = module(*data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert head.mask_hidden.grad.abs().sum() > 0 and head.mask_embedding.grad.abs().sum() > 0
    module.eval()
    with torch.no_grad():
        logits, _ = module(*data)
    assert logits.shape == data[4].shape
    assert {"parallel_greedy_match_depth3", "parallel_tau_greedy_k4"} <= set(module.step_stats)


def test_mask_token_rule():
    class Tok:
        def __init__(self, n, mask=None):
            self.n, self.mask_token_id = n, mask
            self.eos_token_id, self.bos_token_id, self.pad_token_id, self.unk_token_id = 2, 1, 2, 4
            self.all_special_ids = [1, 2, 4, 9]
            self.added_tokens_decoder = {5: type("Added", (), {"special": True})(), 6: type("Added", (), {})()}

        def __len__(self):
            return self.n

    rows = [{"input_ids": [0, 1, 2, 3, 6, 7, 8] + list(range(10, 20))}]    # 4 (unk), 5 and 9 unused
    assert choose_mask_token(20, rows, Tok(20), explicit=11) == 11
    assert choose_mask_token(20, rows, Tok(20, mask=13)) == 13
    assert choose_mask_token(24, rows, Tok(20)) == 20                  # an embedding row no token uses
    assert choose_mask_token(20, rows, Tok(20)) == 5                   # unused, a special token, not unk
    assert choose_mask_token(20, rows, None) == 4                      # unused, lowest id
    assert choose_mask_token(20, [{"input_ids": list(range(20))}], Tok(20)) == 5   # all used: a special one


def test_recipe_settings_are_checked():
    from draftsmith.train.config import load_recipe

    cfg = load_recipe("smollm2-135m/eagle3-parallel-quick")
    d = cfg.drafter
    assert (d.kind, d.parallel, d.parallel_k, d.cod_ratio, d.cod_floor) == ("eagle3", True, 4, 0.7, 0.2)
    quick = load_recipe("smollm2-135m/eagle3-ttt-quick")
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.data.max_length) == \
        (quick.train.max_steps, quick.train.batch_size, quick.data.max_length)
    for overrides, match in ((["drafter.kind=parallel"], "drafter.parallel"),
                             (["drafter.parallel_k=1"], "drafter.parallel_k"),
                             (["drafter.parallel=false", "drafter.mask_token_id=3"], "drafter.mask_token_id")):
        with pytest.raises(DraftsmithError, match=match):
            load_recipe("smollm2-135m/eagle3-parallel-quick", overrides)


# ------------------------------------------------------------------------------------ formats

def speculators_peagle_tensors(c) -> dict[str, list[int]]:
    """The state dict speculators 0.9.0 saves for PEagleDraftModel (one Llama layer): Eagle3DraftModel's
    (test_formats_peers.py) plus `mask_hidden` [1, 1, 3H] (PEagleDraftModel.__init__). The mask token's
    embedding is row mask_token_id of embed_tokens.weight. bench/speculators_peagle_peer.py checks this
    against the installed library."""
    names = speculators_eagle3_tensors(c.hidden_size, c.intermediate_size, c.vocab_size, c.draft_vocab_size,
                                       c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    return {**names, "mask_hidden": [1, 1, 3 * c.hidden_size]}


def test_speculators_peagle_export_matches_the_format_and_reads_back(target4, tmp_path):
    head = peagle_head(target4, aux_layers=[3, 0, 2], k=3)       # unsorted: written in layer order
    embed = target4.model.get_input_embeddings().weight
    write_speculators(head, tmp_path, "org/verifier", ["LlamaForCausalLM"], embed)
    c = head.config
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items()} == speculators_peagle_tensors(c)
    table = weights["embed_tokens.weight"]
    assert torch.equal(table[MASK], head.mask_embedding.detach())
    others = torch.arange(VOCAB) != MASK
    assert torch.equal(table[others], embed.detach()[others])
    raw = json.loads((tmp_path / "config.json").read_text())
    assert (raw["speculators_model_type"], raw["architectures"]) == ("peagle", ["PEagleSpeculator"])
    assert (raw["mask_token_id"], raw["draft_vocab_size"], raw["target_hidden_size"]) == (MASK, 160, 64)
    assert raw["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4] and raw["embed_requires_grad"] is True
    sc = raw["speculators_config"]
    assert sc["algorithm"] == "peagle" and sc["proposal_methods"][0]["speculative_tokens"] == 3
    assert raw["transformer_layer_config"]["num_hidden_layers"] == 1 and raw["norm_before_residual"] is False
    # mask_hidden's three blocks follow fc's into layer order
    h = c.hidden_size
    assert torch.equal(weights["mask_hidden"][..., :h], head.mask_hidden.detach()[..., h:2 * h])

    loaded = read_head_folder(tmp_path, target4.num_layers)
    assert isinstance(loaded, PEagleHead) and loaded.config.aux_layers == [0, 2, 3]
    assert (loaded.config.mask_token_id, loaded.config.parallel_k) == (MASK, 3)
    for prompt in prompts(2, seed=5):
        a = speculative_generate(target4, PEagleProposer(head, target4.model), prompt, k=3, max_new_tokens=16)
        b = speculative_generate(target4, PEagleProposer(loaded, target4.model), prompt, k=3, max_new_tokens=16)
        assert a.tokens == b.tokens and a.accepted == b.accepted
    # draftsmith's own folder round-trips bit for bit
    head.save_pretrained(tmp_path / "own")
    own = read_head_folder(tmp_path / "own", target4.num_layers)
    assert all(torch.equal(x, y) for x, y in zip(own.state_dict().values(), head.state_dict().values()))
    with pytest.raises(DraftsmithError, match="no SGLang layout for P-EAGLE"):
        write_sglang(head, tmp_path / "own")


def test_a_peagle_folder_that_trained_its_embeddings_drafts_with_them(target4, tmp_path):
    head = peagle_head(target4)
    write_speculators(head, tmp_path, "v", ["LlamaForCausalLM"], target4.model.get_input_embeddings().weight)
    assert PEagleProposer(read_head_folder(tmp_path), target4.model).table is None   # the target's: shared
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["embed_tokens.weight"][20] += 1.0
    save_file(weights, str(tmp_path / "model.safetensors"))
    proposer = PEagleProposer(read_head_folder(tmp_path), target4.model)
    assert torch.equal(proposer.table, weights["embed_tokens.weight"])
    del weights["embed_tokens.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(DraftsmithError, match="must carry embed_tokens.weight"):
        read_head_folder(tmp_path)


# ------------------------------------------------------------------------------------ end to end

def test_train_resume_export_and_eval(setup, tmp_path, capsys):  # noqa: F811
    from draftsmith.cli import main

    args = ["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "drafter.kind=eagle3",
            "drafter.parallel=true", "drafter.parallel_k=3", "drafter.draft_vocab_size=200", "train.max_steps=4",
            "checkpoint.every=2", "eval.every=2"]
    assert main(args + ["run.name=a"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any("parallel_greedy_match_depth2" in x for x in lines)
    assert "P-EAGLE mask token" in capsys.readouterr().out
    # resume: run b loses its last checkpoint, resumes from step 2 and ends where run a did
    assert main(args + ["run.name=b"]) == 0
    import shutil

    shutil.rmtree(ckpt_path(tmp_path / "b", 4))
    (tmp_path / "b" / "summary.json").unlink(missing_ok=True)
    capsys.readouterr()
    assert main(args + ["run.name=b", "--resume"]) == 0
    assert f"resumed from {ckpt_path(tmp_path / 'b', 2)} (step 2)" in capsys.readouterr().out
    assert_same_checkpoint(ckpt_path(tmp_path / "a", 4), ckpt_path(tmp_path / "b", 4))

    out = tmp_path / "spec"
    assert main(["export", str(tmp_path / "a"), "--format", "speculators", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["speculators_model_type"] == "peagle"
    assert main(["export", str(tmp_path / "a"), "--format", "sglang", "--out", str(tmp_path / "sg")]) == 2
    for folder in (out, ckpt_path(tmp_path / "a", 4) / "drafter"):
        assert main(["eval", "--target", str(setup / "target"), "--drafter", str(folder), "--bench",
                     str(setup / "bench.jsonl"), "--max-new-tokens", "16", "--k", "3", "--device", "cpu",
                     "--out", str(tmp_path / f"eval-{folder.name}")]) == 0
        assert json.loads((tmp_path / f"eval-{folder.name}" / "report.json").read_text())["lossless_match_rate"] == 1.0
