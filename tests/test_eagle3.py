"""Kind `eagle3` (EAGLE-3 head): lossless in the built-in decoder (greedy equality, exact law with a
reduced-support q), incremental state = a fresh forward, training-time test = what drafting sees,
d2t/t2d refused when missing, and the speculators / SGLang exports load back with identical logits."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftsmith.distill.objective import Objective
from draftsmith.errors import DraftsmithError
from draftsmith.eval.decoder import autoregressive_generate, make_sampler, speculative_generate
from draftsmith.models.row_batch import Feed
from draftsmith.models.layers import target_parts
from draftsmith.models.draft_vocab import draft_vocab_from_counts
from draftsmith.models.eagle3 import Eagle3Head, Eagle3Proposer, Eagle3TrainModule, build_eagle3
from draftsmith.models.layers import default_aux_layers
from draftsmith.models.formats import read_head_folder, write_sglang, write_speculators
from draftsmith.protocol.proposer import DecodeState
from draftsmith.protocol.sampling import Sampling, warp

from conftest import VOCAB, perturbed, prompts
from test_verify import law_of_verify_sampling


def random_head(target, seed=0, vocab_size=160, init="target") -> Eagle3Head:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(VOCAB, generator=g)[:vocab_size].sort().values
    return perturbed(build_eagle3(target.model, default_aux_layers(target.num_layers), ids, init), seed)


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_equality(target4, k):
    proposer = Eagle3Proposer(random_head(target4), target4.model)
    for prompt in prompts(3, seed=k):
        ar = autoregressive_generate(target4, prompt, max_new_tokens=24)
        assert speculative_generate(target4, proposer, prompt, k=k, max_new_tokens=24).tokens == ar.tokens


def test_draft_tokens_stay_in_the_draft_vocabulary(target4):
    head = random_head(target4, vocab_size=40)
    allowed = set(head.draft_ids.tolist())
    seen = []

    class Spy(Eagle3Proposer):
        def propose(self, state, k, sampler):
            draft = super().propose(state, k, sampler)
            seen.extend(draft.tokens)
            return draft

    speculative_generate(target4, Spy(head, target4.model), prompts(1)[0], k=4, max_new_tokens=20)
    assert seen and set(seen) <= allowed


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=20)])
def test_exact_law_with_a_reduced_vocabulary_draft(target4, sampling):
    """q is zero outside the draft vocabulary; verification's law must still be exactly p."""
    head = random_head(target4, vocab_size=60)
    proposer = Eagle3Proposer(head, target4.model)
    prompt = prompts(1)[0]
    cache = target4.new_cache()
    out = target4.forward(prompt[:-1], cache, hidden_layers=proposer.hidden_layers)
    state = DecodeState(tokens=list(prompt), committed=len(prompt) - 1, hidden=out.hidden, hidden_start=0)
    proposer.reset()
    proposer.observe(state)
    draft = proposer.propose(state, 3, make_sampler(sampling, torch.Generator().manual_seed(0)))
    assert draft.q is not None and bool((draft.q[:, ~head.t2d] == 0).all())
    p = warp(target4.forward([prompt[-1]], cache).logits[-1], sampling)
    torch.testing.assert_close(law_of_verify_sampling(p, draft.q[0]), p, rtol=0, atol=1e-6)


def test_incremental_state_equals_a_fresh_forward(target4):
    head = random_head(target4)
    embed, _, _ = target_parts(target4.model)
    checks = []

    class Checked(Eagle3Proposer):
        def observe(self, state):
            super().observe(state)
            n = state.committed
            out = target4.forward(state.tokens[:n], target4.new_cache(), hidden_layers=self.hidden_layers)
            ids = torch.tensor([state.tokens[1:n + 1]])
            fresh = head(embed(ids), head.fuse([h[None] for h in out.hidden]), torch.arange(n)[None])[0, -1]
            torch.testing.assert_close(self.feature, fresh, rtol=1e-4, atol=1e-4)
            checks.append(n)

    sd = speculative_generate(target4, Checked(head, target4.model), prompts(1)[0], k=4, max_new_tokens=30)
    assert len(checks) == sd.steps + 1 and sum(sd.proposed) > sum(sd.accepted)


def test_training_time_test_sees_what_drafting_sees(target4):
    """Step i of the unrolled training forward at row t equals the feature the proposer computes when
    it drafts i tokens (the data's) past a prefix ending at t."""
    head = random_head(target4)
    module = Eagle3TrainModule(head, target4.model, ttt_steps=4, decay=0.8, objective=Objective())
    ids = torch.tensor([prompts(1, length=14)[0]])
    out = target4.forward(ids[0].tolist(), target4.new_cache(), hidden_layers=module.target_layers)
    embed = target_parts(target4.model)[0]
    with torch.no_grad():
        steps = list(module.unroll(embed(ids), [h[None] for h in out.hidden], []))
    proposer = Eagle3Proposer(head, target4.model)
    for t in (0, 5, 9):
        proposer.reset()
        n = t + 1
        state = DecodeState(tokens=ids[0, :n + 1].tolist(), committed=n,
                            hidden=[h[:n] for h in out.hidden], hidden_start=0)
        proposer.observe(state)
        feature = proposer.feature
        for i, h in enumerate(steps):
            torch.testing.assert_close(h[0, t], feature, rtol=1e-4, atol=1e-4)
            if t + 2 + i >= ids.shape[1]:
                break
            token = int(ids[0, t + 2 + i])
            feature = proposer._feed(Feed(feature[None], [token], proposer.length))[-1]


def ttt_batch(target, module, n: int, length: int, seed: int):
    """(ids, attention, mask, hidden, t_logits) of `n` random prompts, every row trained but the first."""
    from draftsmith.models.target import target_signals

    ids = torch.tensor(prompts(n, length=length, seed=seed))
    attention = torch.ones_like(ids)
    mask = torch.ones(n, length - 1, dtype=torch.bool)
    mask[:, 0] = False
    t_logits, hidden = target_signals(target.model, ids, attention, mask, module.target_layers)
    return ids, attention, mask, hidden, t_logits


def test_training_loss_falls_and_logs_every_step(target4):
    torch.manual_seed(0)
    head = random_head(target4).float()
    module = Eagle3TrainModule(head, target4.model, ttt_steps=3, decay=0.8, objective=Objective())
    ids, attention, mask, hidden, t_logits = ttt_batch(target4, module, 4, 20, seed=1)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        logits, loss = module(ids, attention, mask, hidden, t_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert logits.shape == (0, len(head.draft_ids))     # training: nobody reads the rows, none are copied
    module.eval()
    with torch.no_grad():
        full, _ = module(ids, attention, mask, hidden, t_logits)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[head.draft_ids] = False
    assert full.shape == (int(mask[:, 1:].sum()), VOCAB) and torch.isfinite(full[:, head.draft_ids]).all()
    assert torch.isneginf(full[:, outside]).all()       # eval: step 0's rows in the target vocabulary
    assert set(module.step_stats) == {"ttt_greedy_match_step0", "ttt_greedy_match_step1", "ttt_greedy_match_step2",
                                      "ttt_tau_greedy_k4"}
    assert not head.d2t.requires_grad and head.t2d.dtype == torch.bool


def test_draft_vocab_is_the_most_frequent_tokens_ascending():
    counts = torch.tensor([5, 0, 9, 9, 1, 7])
    assert draft_vocab_from_counts(counts, 3).tolist() == [2, 3, 5]
    assert draft_vocab_from_counts(counts, 4).tolist() == [0, 2, 3, 5]
    with pytest.raises(DraftsmithError, match="draft_vocab_size"):
        draft_vocab_from_counts(counts, 7)


def test_checkpoint_without_vocab_maps_is_refused(target4, tmp_path):
    from draftsmith.models import load_drafter

    random_head(target4).save_pretrained(tmp_path / "h")
    assert isinstance(load_drafter(str(tmp_path / "h"), target4), Eagle3Proposer)
    state = load_file(str(tmp_path / "h" / "model.safetensors"))
    del state["d2t"]
    save_file(state, str(tmp_path / "h" / "model.safetensors"))
    with pytest.raises(DraftsmithError, match="d2t"):
        load_drafter(str(tmp_path / "h"), target4)


def test_inconsistent_vocab_maps_are_refused(target4, tmp_path):
    head = random_head(target4)
    head.t2d[int((~head.t2d).nonzero()[0])] = True
    head.save_pretrained(tmp_path / "h")
    with pytest.raises(DraftsmithError, match="disagree"):
        Eagle3Head.from_pretrained(tmp_path / "h")


@pytest.mark.parametrize("fmt", ["speculators", "sglang", "draftsmith"])
def test_export_round_trip_gives_identical_draft_logits(target4, tmp_path, fmt):
    head = random_head(target4)
    out = tmp_path / fmt
    out.mkdir()
    if fmt == "speculators":
        write_speculators(head, out, "tiny", ["LlamaForCausalLM"], target4.model.get_input_embeddings().weight)
        raw = json.loads((out / "config.json").read_text())
        assert raw["speculators_model_type"] == "eagle3"
        assert raw["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in head.config.aux_layers]
        assert "layers.0.hidden_norm.weight" in load_file(str(out / "model.safetensors"))
    elif fmt == "sglang":
        write_sglang(head, out)
        raw = json.loads((out / "config.json").read_text())
        assert raw["architectures"] == ["LlamaForCausalLMEagle3"] and raw["draft_vocab_size"] == 160
        assert "midlayer.self_attn.q_proj.weight" in load_file(str(out / "model.safetensors"))
    else:
        head.save_pretrained(out)
    loaded = read_head_folder(out, target4.num_layers)
    assert loaded.config.aux_layers == head.config.aux_layers
    assert torch.equal(loaded.d2t, head.d2t) and torch.equal(loaded.t2d, head.t2d)
    g = torch.Generator().manual_seed(1)
    hid = [torch.randn(1, 6, 64, generator=g) for _ in range(3)]
    emb = torch.randn(1, 6, 64, generator=g)
    pos = torch.arange(6)[None]
    with torch.no_grad():
        a = head.logits(head(emb, head.fuse(hid), pos))
        b = loaded.logits(loaded(emb, loaded.fuse(hid), pos))
    assert torch.equal(a, b)
    # and decoding with the loaded head gives the same draft tokens
    ta = speculative_generate(target4, Eagle3Proposer(head, target4.model), prompts(1)[0], k=4, max_new_tokens=16)
    tb = speculative_generate(target4, Eagle3Proposer(loaded, target4.model), prompts(1)[0], k=4, max_new_tokens=16)
    assert ta.accepted == tb.accepted and ta.tokens == tb.tokens


def test_batch_without_a_learnable_row_gives_a_zero_loss_that_backpropagates(target4):
    """Every target argmax outside the draft vocabulary (or no assistant token): loss 0, zero grads,
    no "does not require grad" crash in the trainer's backward."""
    head = random_head(target4).float()
    module = Eagle3TrainModule(head, target4.model, ttt_steps=3, decay=0.8, objective=Objective())
    ids, attention, mask, hidden, t_logits = ttt_batch(target4, module, 2, 12, seed=2)
    outside = (~head.t2d).nonzero()[0, 0]
    t_logits[:, outside] = 1e4                     # every argmax lies outside the draft vocabulary
    _, loss = module(ids, attention, mask, hidden, t_logits)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters() if p.requires_grad)
