"""Kind `eagle` (EAGLE-1/2 feature head): lossless in the built-in decoder, its incremental
drafting state equals a fresh forward, save/load round trip, and it trains from a recipe."""

import copy

import pytest
import torch

from draftsmith.errors import DraftsmithError
from draftsmith.eval.decoder import autoregressive_generate, speculative_generate
from draftsmith.models.eagle import EagleHead, EagleProposer, build_eagle, target_parts
from draftsmith.protocol.sampling import Sampling

from conftest import perturbed, prompts


def random_head(target, seed=0) -> EagleHead:
    return perturbed(build_eagle(target.model, feature_scale=1.0), seed)


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_equality(target, k):
    proposer = EagleProposer(random_head(target), target.model)
    for prompt in prompts(3, seed=k):
        ar = autoregressive_generate(target, prompt, max_new_tokens=24)
        assert speculative_generate(target, proposer, prompt, k=k, max_new_tokens=24).tokens == ar.tokens


def test_sampling_runs_and_is_reproducible(target):
    proposer = EagleProposer(random_head(target), target.model)
    runs = [speculative_generate(target, proposer, prompts(1)[0], k=3, max_new_tokens=16,
                                 sampling=Sampling(temperature=0.8), generator=torch.Generator().manual_seed(3)).tokens
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_incremental_state_equals_a_fresh_forward(target):
    """After every verify step the head's cached rows and its last feature equal a forward over all
    committed rows from scratch: rejected drafts leave no trace."""
    head = random_head(target)
    embed, norm, _ = target_parts(target.model)
    checks = []

    class Checked(EagleProposer):
        def observe(self, state):
            super().observe(state)
            n = state.committed
            cache = target.new_cache()
            out = target.forward(state.tokens[:n], cache, hidden_layers=(-1,))
            ids = torch.tensor([state.tokens[1:n + 1]])
            fresh = head(embed(ids), norm(out.hidden[0][None]), torch.arange(n)[None])[0, -1]
            torch.testing.assert_close(self.feature, fresh, rtol=1e-4, atol=1e-4)
            assert self.length == n
            checks.append(n)

    sd = speculative_generate(target, Checked(head, target.model), prompts(1)[0], k=4, max_new_tokens=30)
    assert len(checks) == sd.steps + 1 and sum(sd.proposed) > sum(sd.accepted)   # rejections happened


def test_save_load_round_trip_gives_identical_draft_logits(target, tmp_path):
    head = random_head(target)
    head.save_pretrained(tmp_path / "eagle")
    loaded = EagleHead.from_pretrained(tmp_path / "eagle")
    x = torch.randn(1, 5, head.config.hidden_size)
    e = torch.randn(1, 5, head.config.hidden_size)
    pos = torch.arange(5)[None]
    assert torch.equal(head(e, x, pos), loaded(e, x, pos))
    (tmp_path / "eagle" / "config.json").write_text((tmp_path / "eagle" / "config.json").read_text()
                                                    .replace('"intermediate_size": 128', '"intermediate_size": 64'))
    with pytest.raises(Exception):
        EagleHead.from_pretrained(tmp_path / "eagle")


def test_load_drafter_dispatches_on_kind(target, tmp_path):
    from draftsmith.models import load_drafter

    random_head(target).save_pretrained(tmp_path / "eagle")
    assert isinstance(load_drafter(str(tmp_path / "eagle"), target), EagleProposer)
    small = copy.deepcopy(target)
    small.vocab_size = 999
    with pytest.raises(DraftsmithError, match="vocabulary"):
        load_drafter(str(tmp_path / "eagle"), small)


@pytest.mark.parametrize("fmt", ["speculators-legacy", "sglang"])
def test_serving_formats_round_trip_with_identical_draft_logits(target, tmp_path, fmt):
    """EAGLE-1 layout in SGLang (LlamaForCausalLMEagle) names, and in the speculators `eagle` layout
    (fusion_fc / transformer.*) that draftsmith wrote before speculators 0.9.0 dropped the type (now
    refused on export, still read): read back bit-identical, and decoding with it is unchanged."""
    import json

    from safetensors.torch import load_file

    from draftsmith.models.formats import read_head_folder, write_sglang

    from test_formats_peers import write_legacy_speculators_eagle

    head = random_head(target)
    out = tmp_path / fmt
    out.mkdir()
    if fmt == "speculators-legacy":
        write_legacy_speculators_eagle(head, out)
        raw = json.loads((out / "config.json").read_text())
        assert raw["speculators_model_type"] == "eagle" and raw["layernorms"] is False and raw["fusion_bias"]
        assert {"fusion_fc.weight", "fusion_fc.bias", "transformer.self_attn.q_proj.weight"} <= set(
            load_file(str(out / "model.safetensors")))
    else:
        write_sglang(head, out)
        assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle"]
    weights = load_file(str(out / "model.safetensors"))
    assert not any("input_layernorm" in k or "lm_head" in k or "embed_tokens" in k for k in weights)
    loaded = read_head_folder(out)
    x, e, pos = torch.randn(1, 5, 64), torch.randn(1, 5, 64), torch.arange(5)[None]
    with torch.no_grad():
        assert torch.equal(head(e, x, pos), loaded(e, x, pos))
    a = speculative_generate(target, EagleProposer(head, target.model), prompts(1)[0], k=3, max_new_tokens=16)
    b = speculative_generate(target, EagleProposer(loaded, target.model), prompts(1)[0], k=3, max_new_tokens=16)
    assert a.tokens == b.tokens and a.accepted == b.accepted
