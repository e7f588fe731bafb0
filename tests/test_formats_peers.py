"""Exports mean to peers what docs/formats.md says (issue 9): the speculators eagle3 checkpoint holds
every tensor speculators' Eagle3 model declares, kind eagle is refused for speculators, tapped layers
are written in layer order, and an `hf` export carries nothing of a GGUF target's quantization."""

import json
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from draftsmith.errors import DraftsmithError
from draftsmith.models.eagle import EagleHead, build_eagle
from draftsmith.models.eagle3 import build_eagle3
from draftsmith.models.formats import read_head_folder, write_sglang, write_speculators
from draftsmith.models.target import Target

from conftest import perturbed, tiny_llama
from tiny import make_tiny_tokenizer


def speculators_eagle3_tensors(h: int, inter: int, vocab: int, draft_vocab: int, heads: int, kv_heads: int,
                               head_dim: int) -> dict[str, list[int]]:
    """The state dict speculators 0.9.0 saves for a one-layer Llama Eagle3 model (norm_before_fc and
    fc_norm off), read from its code: DraftVocabMixin._init_vocab (t2d, d2t, embed_tokens, lm_head;
    verifier_lm_head is in _keys_to_ignore_on_save), Eagle3DraftModel.__init__ (fc [H, 3H] without
    bias, layers, norm; verifier_norm ignored on save) and LlamaDecoderEagle3FirstLayer (q/k/v take
    2H, an extra hidden_norm). bench/speculators_peer.py checks this list against the installed library."""
    layer = {
        "self_attn.q_proj.weight": [heads * head_dim, 2 * h], "self_attn.k_proj.weight": [kv_heads * head_dim, 2 * h],
        "self_attn.v_proj.weight": [kv_heads * head_dim, 2 * h], "self_attn.o_proj.weight": [h, heads * head_dim],
        "mlp.gate_proj.weight": [inter, h], "mlp.up_proj.weight": [inter, h], "mlp.down_proj.weight": [h, inter],
        "input_layernorm.weight": [h], "post_attention_layernorm.weight": [h], "hidden_norm.weight": [h],
    }
    return {"t2d": [vocab], "d2t": [draft_vocab], "embed_tokens.weight": [vocab, h], "lm_head.weight": [draft_vocab, h],
            "fc.weight": [h, 3 * h], "norm.weight": [h], **{f"layers.0.{k}": v for k, v in layer.items()}}


@pytest.fixture
def target8() -> Target:
    return Target(tiny_llama(0, layers=8), tokenizer=None, name="tiny-target")


def eagle3_head(target, aux_layers=(1, 3, 6), draft_vocab=160):
    ids = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(0))[:draft_vocab].sort().values
    return perturbed(build_eagle3(target.model, list(aux_layers), ids)).eval()


def write_legacy_speculators_eagle(head: EagleHead, out) -> None:
    """The speculators `eagle` layout draftsmith wrote before speculators 0.9.0 dropped the type: still read."""
    from draftsmith.models.formats import _layer_config

    config = {"speculators_model_type": "eagle", "architectures": ["EagleSpeculator", "LlamaDecoderLayer"],
              "transformer_layer_config": _layer_config(head.config, "float32"), "layernorms": False,
              "fusion_bias": True, "speculators_version": "0.3.0"}
    (out / "config.json").write_text(json.dumps(config))
    save_file({k.replace("fc.", "fusion_fc.", 1).replace("layers.0.", "transformer.", 1): v.contiguous()
               for k, v in head.state_dict().items()}, str(out / "model.safetensors"))


def test_speculators_eagle3_export_holds_every_tensor_speculators_declares(target8, tmp_path):
    head = eagle3_head(target8)
    embed = target8.model.get_input_embeddings().weight
    write_speculators(head, tmp_path, "org/verifier", ["LlamaForCausalLM"], embed)
    c = head.config
    expected = speculators_eagle3_tensors(c.hidden_size, c.intermediate_size, c.vocab_size, c.draft_vocab_size,
                                          c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items()} == expected
    assert torch.equal(weights["embed_tokens.weight"], embed.detach())   # the target's, not zeros
    raw = json.loads((tmp_path / "config.json").read_text())
    layer = raw["transformer_layer_config"]
    assert raw["speculators_model_type"] == "eagle3" and raw["architectures"] == ["Eagle3Speculator"]
    assert (layer["model_type"], layer["num_hidden_layers"], layer["vocab_size"]) == ("llama", 1, c.vocab_size)
    assert (raw["draft_vocab_size"], raw["target_hidden_size"]) == (c.draft_vocab_size, c.hidden_size)
    assert raw["eagle_aux_hidden_state_layer_ids"] == [2, 4, 7]   # vLLM counts the stream entering a layer
    assert raw["speculators_config"]["verifier"]["name_or_path"] == "org/verifier"
    with pytest.raises(DraftsmithError, match="input embedding"):
        write_speculators(head, tmp_path, "org/verifier", ["LlamaForCausalLM"], None)


def test_speculators_refuses_kind_eagle_and_old_exports_still_read(target8, tmp_path):
    head = perturbed(build_eagle(target8.model, 1.0))
    with pytest.raises(DraftsmithError, match="speculators has no EAGLE-1.*--format sglang.*--format hf"):
        write_speculators(head, tmp_path, "org/verifier", ["LlamaForCausalLM"], None)
    assert not list(tmp_path.iterdir())
    write_legacy_speculators_eagle(head, tmp_path)
    loaded = read_head_folder(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), head.state_dict().values()))


@pytest.mark.parametrize("fmt", ["speculators", "sglang"])
def test_unsorted_aux_layers_are_exported_in_layer_order(target8, tmp_path, fmt):
    """A head trained on layers [6, 1, 3] is written as [1, 3, 6] with fc's column blocks permuted:
    an engine that concatenates the taps in layer order computes the same drafts."""
    head = eagle3_head(target8, aux_layers=(6, 1, 3))
    if fmt == "speculators":
        write_speculators(head, tmp_path, "v", ["LlamaForCausalLM"], target8.model.get_input_embeddings().weight)
        assert json.loads((tmp_path / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == [2, 4, 7]
    else:
        write_sglang(head, tmp_path)
        raw = json.loads((tmp_path / "config.json").read_text())
        assert raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]
    loaded = read_head_folder(tmp_path, target8.num_layers)
    assert loaded.config.aux_layers == [1, 3, 6]
    g = torch.Generator().manual_seed(1)
    taps = {i: torch.randn(1, 5, 64, generator=g) for i in (1, 3, 6)}
    emb, pos = torch.randn(1, 5, 64, generator=g), torch.arange(5)[None]
    with torch.no_grad():
        a = head.logits(head(emb, head.fuse([taps[i] for i in (6, 1, 3)]), pos))
        b = loaded.logits(loaded(emb, loaded.fuse([taps[i] for i in (1, 3, 6)]), pos))
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(a.argmax(-1), b.argmax(-1))


def test_recipe_sorts_unsorted_aux_layers_with_a_notice(capsys):
    from draftsmith.train.config import load_recipe

    cfg = load_recipe("smollm2-135m/eagle3-ttt-quick", ["drafter.aux_layers=[26, 1, 14]"])
    assert cfg.drafter.aux_layers == [1, 14, 26]
    assert "sorted to [1, 14, 26]" in capsys.readouterr().err


def test_hf_export_drops_a_gguf_targets_quantization_config(tmp_path, capsys):
    """A GGUF-converted target's config carries quantization_config (gguf) and the GGUF's name; a
    small_lm copies its config: the export must not tell serving engines the drafter is GGUF-quantized."""
    from transformers import AutoModelForCausalLM

    from draftsmith.cli import main

    tok = make_tiny_tokenizer()
    model = tiny_llama(0, layers=2, vocab=len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    config = json.loads((tmp_path / "target" / "config.json").read_text())
    config.update(quantization_config={"dequantize": False, "gguf_file": "t.gguf", "quant_method": "gguf"},
                  _model_name_or_path="Tiny GGUF")
    (tmp_path / "target" / "config.json").write_text(json.dumps(config))
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(30)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    recipe = {"description": "tiny", "target": {"name": str(tmp_path / "target"), "dtype": "fp32"},
              "drafter": {"kind": "small_lm", "num_layers": 1},
              "data": {"source": str(tmp_path / "chats.jsonl"), "max_length": 48, "heldout_fraction": 0.2,
                       "cache_dir": str(tmp_path / "cache")},
              "train": {"max_steps": 0, "batch_size": 2, "mixed_precision": "no"},
              "eval": {"batches": 1}, "log": {"tensorboard": False}, "run": {"out_dir": str(tmp_path / "runs")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    assert main(["export", str(tmp_path / "runs" / "r"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in exported and "_model_name_or_path" not in exported
    assert exported["draftsmith_kind"] == "small_lm"
    assert getattr(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config, "quantization_config", None) is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_recorded_speculators_peer_result_holds_only_rows_the_script_writes():
    """The row for an export without the embedding recorded 100% and did not reproduce (a rerun: 45.8%);
    it is dropped, and the script no longer builds that variant (bench/results/README.md)."""
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))
    try:
        from speculators_peer import EXPORTS
    finally:
        sys.path.remove(str(bench))
    result = json.loads((bench / "results" / "speculators-0.9.0-peer" / "result.json").read_text())
    assert set(result) == {*EXPORTS, "declared"} and EXPORTS == ("export",)
    assert result["export"]["argmax_agreement"] == 1.0 and result["export"]["embedding_equal"]
