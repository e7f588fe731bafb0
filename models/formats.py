"""Serving formats of the EAGLE heads: vLLM's speculators checkpoints (`eagle`, `eagle3`) and
SGLang's `LlamaForCausalLMEagle` / `LlamaForCausalLMEagle3`.

Kind eagle (EAGLE-1 layout):
  draftsmith / SGLang               speculators
  fc.weight [H, 2H], fc.bias        fusion_fc.weight, fusion_fc.bias
  layers.0.<...>                    transformer.<...>  (self_attn.{q,k,v,o}_proj, post_attention_layernorm,
                                                        mlp.{gate,up,down}_proj; no input norm)
The target's embedding and LM head are shared, never written.

Kind eagle3: both formats hold the same tensors as draftsmith's own eagle3 folder:

  draftsmith / speculators          SGLang
  fc.weight [H, 3H]                 fc.weight
  layers.0.<...>                    midlayer.<...>   (input_layernorm, hidden_norm, self_attn.{q,k,v,o}_proj,
                                                      post_attention_layernorm, mlp.{gate,up,down}_proj)
  norm.weight, lm_head.weight [Vd, H], d2t [Vd] int64, t2d [V] bool   (same names)

The token embedding is the target's and is not written: vLLM and SGLang share the target's
embedding with a draft checkpoint that has none. Layer ids: draftsmith counts target layer outputs
(0-based); speculators' `eagle_aux_hidden_state_layer_ids` count the residual stream entering a layer
(vLLM), i.e. +1; SGLang's `eagle_config.eagle_aux_hidden_state_layer_ids` count outputs like
draftsmith (SGLang adds 1 when it captures). docs/formats.md documents every field.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.models.eagle import EagleConfig, EagleHead
from draftsmith.models.eagle3 import Eagle3Config, Eagle3Head

SPECULATORS_VERSION = "0.3.0"


def _layer_config(c: EagleConfig, dtype: str) -> dict:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": None, "max_position_embeddings": 32768, "vocab_size": c.vocab_size,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": dtype,
    }


def _dtype_name(head) -> str:
    return str(head.fc.weight.dtype).removeprefix("torch.")


def _save(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / "model.safetensors"))


def _speculators_config(algorithm: str, verifier: str, verifier_arch: list[str], k: int) -> dict:
    return {"algorithm": algorithm,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": k}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": verifier_arch}}


def write_speculators(head, out: Path, verifier: str, verifier_arch: list[str], k: int = 4) -> None:
    c = head.config
    if isinstance(head, EagleHead):
        config = {
            "speculators_model_type": "eagle",
            "architectures": ["EagleSpeculator", "LlamaDecoderLayer"],
            "transformer_layer_architecture": "LlamaDecoderLayer",
            "transformer_layer_config": _layer_config(c, _dtype_name(head)),
            "layernorms": False,
            "fusion_bias": True,
            "speculators_config": _speculators_config("eagle", verifier, verifier_arch, k),
            "speculators_version": SPECULATORS_VERSION,
            "torch_dtype": _dtype_name(head),
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        _save({k.replace("fc.", "fusion_fc.", 1).replace("layers.0.", "transformer.", 1): v
               for k, v in head.state_dict().items()}, out)
        return
    config = {
        "speculators_model_type": "eagle3",
        "architectures": ["Eagle3Speculator"],
        "transformer_layer_config": _layer_config(c, _dtype_name(head)),
        "draft_vocab_size": c.draft_vocab_size,
        "norm_before_residual": c.norm_before_residual,
        "target_hidden_size": c.target_hidden_size or c.hidden_size,
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in c.aux_layers],
        "embed_requires_grad": False,
        "speculators_config": _speculators_config("eagle3", verifier, verifier_arch, k),
        "speculators_version": SPECULATORS_VERSION,
        "torch_dtype": _dtype_name(head),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save(head.state_dict(), out)


def write_sglang(head, out: Path) -> None:
    c = head.config
    if isinstance(head, EagleHead):
        config = {**_layer_config(c, _dtype_name(head)), "architectures": ["LlamaForCausalLMEagle"]}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        _save(head.state_dict(), out)
        return
    if c.norm_before_residual:
        raise DraftsmithError("SGLang's LlamaForCausalLMEagle3 keeps the un-normed feature as the residual",
                              "norm_before_residual: true", "Export with --format speculators instead")
    config = {**_layer_config(c, _dtype_name(head)),
              "architectures": ["LlamaForCausalLMEagle3"],
              "draft_vocab_size": c.draft_vocab_size,
              "target_hidden_size": c.target_hidden_size or c.hidden_size,
              "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(c.aux_layers), "use_aux_hidden_state": True}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save({k.replace("layers.0.", "midlayer.", 1): v for k, v in head.state_dict().items()}, out)


def _load_state(path: Path) -> dict:
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise DraftsmithError("No weights in this drafter folder", str(path),
                          "Expected model.safetensors or pytorch_model.bin beside config.json")


def _config_from_llama(layer: dict, cls=Eagle3Config, **extra):
    heads = layer["num_attention_heads"]
    theta = layer.get("rope_theta") or (layer.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return cls(hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"],
                        num_attention_heads=heads, num_key_value_heads=layer.get("num_key_value_heads", heads),
                        head_dim=layer.get("head_dim") or layer["hidden_size"] // heads,
                        rms_norm_eps=layer["rms_norm_eps"], rope_theta=float(theta), vocab_size=layer["vocab_size"],
                        **extra)


def read_head_folder(path: Path, target_num_layers: int | None = None):
    """An EagleHead or Eagle3Head from a draftsmith, speculators or SGLang folder; None for other drafters."""
    raw = json.loads((path / "config.json").read_text())
    if raw.get("draftsmith_kind") == "eagle3":
        return Eagle3Head.from_pretrained(path)
    if raw.get("draftsmith_kind") == "eagle":
        return EagleHead.from_pretrained(path)
    drop = ("embed_tokens.", "verifier", "lm_head.", "model.embed_tokens.")
    if raw.get("speculators_model_type") == "eagle":
        if raw.get("layernorms"):
            raise DraftsmithError("draftsmith serves the EAGLE-1 layout (speculators layernorms: false)",
                                  "layernorms: true", "Use an eagle3 speculator or an EAGLE-1/2 checkpoint")
        c = _config_from_llama(raw["transformer_layer_config"], cls=EagleConfig)
        state = {k.replace("fusion_fc.", "fc.", 1).replace("transformer.", "layers.0.", 1): v
                 for k, v in _load_state(path).items() if not k.startswith(drop)}
        state.setdefault("fc.bias", torch.zeros(c.hidden_size, dtype=state["fc.weight"].dtype))
        return EagleHead.from_state(c, state, str(path))
    if "LlamaForCausalLMEagle" in raw.get("architectures", []):
        c = _config_from_llama(raw, cls=EagleConfig)
        state = {k.removeprefix("model."): v for k, v in _load_state(path).items()}
        return EagleHead.from_state(c, {k: v for k, v in state.items() if not k.startswith(drop)}, str(path))
    if "speculators_model_type" in raw:
        if raw["speculators_model_type"] != "eagle3":
            raise DraftsmithError("draftsmith reads speculators checkpoints of type eagle and eagle3",
                                  raw["speculators_model_type"], "Use an eagle or eagle3 speculator")
        layer = raw["transformer_layer_config"]
        c = _config_from_llama(layer, draft_vocab_size=raw["draft_vocab_size"],
                               aux_layers=[i - 1 for i in raw["eagle_aux_hidden_state_layer_ids"]],
                               target_hidden_size=raw.get("target_hidden_size") or layer["hidden_size"],
                               norm_before_residual=bool(raw.get("norm_before_residual", False)))
        state = {k: v for k, v in _load_state(path).items() if not k.startswith(("embed_tokens.", "verifier"))}
        return Eagle3Head.from_state(c, state, str(path))
    if "LlamaForCausalLMEagle3" in raw.get("architectures", []):
        ids = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        if ids is None:
            if target_num_layers is None:
                raise DraftsmithError("This SGLang EAGLE-3 config names no aux layers", str(path),
                                      "Load it against a target (SGLang's default is 2, N/2, N-3 before-layer)")
            n = target_num_layers
            ids = [2 - 1, n // 2 - 1, n - 3 - 1]
        vd = raw.get("draft_vocab_size") or raw["vocab_size"]
        c = _config_from_llama(raw, draft_vocab_size=vd, aux_layers=list(ids),
                               target_hidden_size=raw.get("target_hidden_size") or raw["hidden_size"])
        state = {k.removeprefix("model.").replace("midlayer.", "layers.0.", 1): v
                 for k, v in _load_state(path).items()}
        state = {k: v for k, v in state.items() if not k.startswith("embed_tokens.")}
        return Eagle3Head.from_state(c, state, str(path))
    return None


def proposer_for(head, target_model):
    from draftsmith.models.eagle import EagleProposer
    from draftsmith.models.eagle3 import Eagle3Proposer

    return (Eagle3Proposer if isinstance(head, Eagle3Head) else EagleProposer)(head, target_model)
