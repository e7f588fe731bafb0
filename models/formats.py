"""Serving formats of the EAGLE heads: vLLM's speculators checkpoints (`eagle3`, `peagle`) and SGLang's
`LlamaForCausalLMEagle` / `LlamaForCausalLMEagle3`; and what an `hf` export must not carry over.

Kind eagle (EAGLE-1 layout): SGLang's names are draftsmith's (fc.weight [H, 2H], fc.bias, layers.0.<...>,
no input norm). speculators 0.9.0 has no EAGLE-1 type (its types: eagle3, peagle, dflash, mtp, ...), so
`--format speculators` refuses kind eagle; folders draftsmith wrote earlier in speculators' old `eagle`
layout (fusion_fc.*, transformer.*) are still read. The target's embedding and LM head are shared.

Kind eagle3: both formats hold draftsmith's own eagle3 tensors:

  draftsmith / speculators          SGLang
  fc.weight [H, 3H]                 fc.weight
  layers.0.<...>                    midlayer.<...>   (input_layernorm, hidden_norm, self_attn.{q,k,v,o}_proj,
                                                      post_attention_layernorm, mlp.{gate,up,down}_proj)
  norm.weight, lm_head.weight [Vd, H], d2t [Vd] int64, t2d [V] bool   (same names)
  embed_tokens.weight [V, H]        -                (speculators only: the target's, see write_speculators)

Kind eagle3 with parallel: true (P-EAGLE, models/peagle.py): speculators' `peagle` type, the eagle3
tensors plus mask_hidden [1, 1, 3H] (fc's input for mask rows, permuted with fc's blocks) and the
mask token's learnt embedding written as row mask_token_id of embed_tokens.weight. SGLang: refused.

Layer ids: draftsmith counts target layer outputs (0-based); speculators' `eagle_aux_hidden_state_layer_ids`
count the residual stream entering a layer (vLLM), i.e. +1; SGLang's `eagle_config.eagle_aux_hidden_state_layer_ids`
count outputs like draftsmith (SGLang adds 1 when it captures). Both engines fuse the tapped layers in
layer order, so an export writes them ascending with fc's column blocks permuted to match.
docs/formats.md documents every field.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.models.block_drafter import BlockHead, BlockProposer
from draftsmith.models.block_formats import SPECULATORS_TYPES, read_block_speculators, write_block_speculators
from draftsmith.models.checks import TargetShape, checked_state, load_weights, read_config_json, weight_shapes
from draftsmith.models.dflash import DFlashHead
from draftsmith.models.dspark import DSparkHead
from draftsmith.models.eagle import EagleConfig, EagleHead, EagleProposer
from draftsmith.models.eagle3 import Eagle3Config, Eagle3Head, Eagle3Proposer
from draftsmith.models.peagle import PEagleConfig, PEagleHead, PEagleProposer
from draftsmith.models.target import resolve_model_folder

SPECULATORS_VERSION = "0.9.0"
"""The speculators release whose Eagle3 model these checkpoints were checked against (bench/speculators_peer.py)."""

TARGET_ONLY_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")
"""Keys a GGUF-converted target leaves in a copied config: serving engines read `quantization_config`
and would treat the dequantised drafter as GGUF-quantized; `_model_name_or_path` is the GGUF's own name."""


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


def in_layer_order(head: Eagle3Head) -> tuple[list[int], dict]:
    """(aux layers ascending, the state dict with fc's column blocks permuted to match): the same head
    for engines that concatenate the tapped layers in layer order (SGLang, vLLM)."""
    c, state = head.config, dict(head.state_dict())
    order = sorted(range(len(c.aux_layers)), key=lambda i: c.aux_layers[i])
    width = c.target_hidden_size or c.hidden_size
    for name in ("fc.weight", "mask_hidden"):   # P-EAGLE's mask_hidden stands for the three taps too
        if name in state:
            blocks = state[name].split(width, dim=-1)
            state[name] = torch.cat([blocks[i] for i in order], dim=-1)
    return [c.aux_layers[i] for i in order], state


def write_speculators(head, out: Path, verifier: str, verifier_arch: list[str], embed_tokens: torch.Tensor | None,
                      k: int = 4) -> None:
    """An eagle3 head as speculators' Eagle3 checkpoint. `embed_tokens` [V, H] is the target's input
    embedding: speculators' own save always writes it, and its Eagle3 model loaded under transformers 5
    keeps a checkpoint without it at all-zero embeddings instead of fetching the verifier's."""
    if isinstance(head, BlockHead):   # dflash / dspark (models/block_formats.py): no embed_tokens
        return write_block_speculators(head, out, verifier, verifier_arch, speculators_config=_speculators_config,
                                       version=SPECULATORS_VERSION)
    if isinstance(head, EagleHead):
        raise DraftsmithError("speculators has no EAGLE-1 checkpoint type (0.9.0 knows eagle3, peagle, dflash, "
                              "mtp, ...), so vLLM would refuse this export", "--format speculators with kind eagle",
                              "Export it with --format sglang (SGLang's LlamaForCausalLMEagle) or --format hf "
                              "(draftsmith eval), or train kind eagle3 for vLLM")
    c = head.config
    if embed_tokens is None or tuple(embed_tokens.shape) != (c.vocab_size, c.hidden_size):
        raise DraftsmithError("A speculators eagle3 export needs the target's input embedding [vocab, hidden]",
                              None if embed_tokens is None else list(embed_tokens.shape),
                              f"Pass the target's embed_tokens weight of shape [{c.vocab_size}, {c.hidden_size}]")
    aux_layers, state = in_layer_order(head)
    parallel = isinstance(head, PEagleHead)
    embed_tokens = embed_tokens.to(state["fc.weight"].dtype)
    if parallel:   # speculators keeps the mask token's embedding as that row of its table
        embed_tokens = embed_tokens.clone()
        embed_tokens[c.mask_token_id] = state.pop("mask_embedding")
    config = {
        "speculators_model_type": "peagle" if parallel else "eagle3",
        "architectures": ["PEagleSpeculator" if parallel else "Eagle3Speculator"],
        "transformer_layer_config": _layer_config(c, _dtype_name(head)),
        "draft_vocab_size": c.draft_vocab_size,
        "norm_before_residual": c.norm_before_residual,
        "target_hidden_size": c.target_hidden_size or c.hidden_size,
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in aux_layers],
        "embed_requires_grad": False,
        "speculators_config": _speculators_config("eagle3", verifier, verifier_arch, k),
        "speculators_version": SPECULATORS_VERSION,
        "torch_dtype": _dtype_name(head),
    }
    if parallel:
        # P-EAGLE's default: the table trains (draftsmith learns its mask row only); the drafts per
        # forward are the depths the head was trained for
        config.update(mask_token_id=c.mask_token_id, embed_requires_grad=True,
                      speculators_config=_speculators_config("peagle", verifier, verifier_arch, c.parallel_k))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save({**state, "embed_tokens.weight": embed_tokens}, out)


def write_sglang(head, out: Path) -> None:
    c = head.config
    if isinstance(head, PEagleHead):
        raise DraftsmithError("draftsmith writes no SGLang layout for P-EAGLE: SGLang's LlamaForCausalLMEagle3 "
                              "reads no mask token and drafts one token per forward", "--format sglang with "
                              "drafter.parallel: true", "Export it with --format speculators (vLLM's peagle "
                              "type) or --format hf (draftsmith eval)")
    if isinstance(head, EagleHead):
        config = {**_layer_config(c, _dtype_name(head)), "architectures": ["LlamaForCausalLMEagle"]}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        _save(head.state_dict(), out)
        return
    if c.norm_before_residual:
        raise DraftsmithError("SGLang's LlamaForCausalLMEagle3 keeps the un-normed feature as the residual",
                              "norm_before_residual: true", "Export with --format speculators instead")
    aux_layers, state = in_layer_order(head)
    config = {**_layer_config(c, _dtype_name(head)),
              "architectures": ["LlamaForCausalLMEagle3"],
              "draft_vocab_size": c.draft_vocab_size,
              "target_hidden_size": c.target_hidden_size or c.hidden_size,
              "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux_layers, "use_aux_hidden_state": True}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save({k.replace("layers.0.", "midlayer.", 1): v for k, v in state.items()}, out)


def target_embedding(target_spec: str) -> torch.Tensor:
    """The target's input embedding [V, H], read alone from its safetensors files (no model is built)."""
    from safetensors import safe_open

    folder = Path(resolve_model_folder(target_spec)[0])
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            name = next((n for n in f.keys() if n.endswith("embed_tokens.weight")), None)
            if name is not None:
                return f.get_tensor(name)
    raise DraftsmithError("Cannot find the target's embed_tokens weight in its safetensors files", str(folder),
                          "Export from a run whose target is a local folder, a .gguf file or an asset")


def strip_target_leftovers(config_file: Path) -> None:
    """Drop what a drafter's config.json inherited from a GGUF-converted target (TARGET_ONLY_CONFIG_KEYS)."""
    raw = json.loads(config_file.read_text())
    if any(key in raw for key in TARGET_ONLY_CONFIG_KEYS):
        config_file.write_text(json.dumps({k: v for k, v in raw.items() if k not in TARGET_ONLY_CONFIG_KEYS},
                                          indent=2, sort_keys=True) + "\n")


def _config_from_llama(layer: dict, where: str, cls=Eagle3Config, **extra):
    """A head config from a Llama config dict (speculators' transformer_layer_config, SGLang's config)."""
    try:
        heads = layer["num_attention_heads"]
        theta = layer.get("rope_theta") or (layer.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        return cls(hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"],
                   num_attention_heads=heads, num_key_value_heads=layer.get("num_key_value_heads", heads),
                   head_dim=layer.get("head_dim") or layer["hidden_size"] // heads,
                   rms_norm_eps=layer["rms_norm_eps"], rope_theta=float(theta), vocab_size=layer["vocab_size"],
                   **extra)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise DraftsmithError("The drafter's config.json lacks a valid Llama layer config", f"{where}: {err!r}",
                              "Re-export the drafter, or check its config.json against docs/formats.md") from None


def _layer_ids(raw: dict, key: str, where: str) -> list:
    ids = raw.get(key)
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DraftsmithError(f"The drafter's config.json needs {key} as a list of layer ids", f"{where}: {ids!r}",
                              "Re-export the drafter, or check its config.json against docs/formats.md")
    return ids


def read_head_folder(path: Path, target: TargetShape | int | None = None):
    """An EagleHead or Eagle3Head from a draftsmith, speculators or SGLang folder; None for other drafters.

    `target` (a TargetShape, or only its layer count) is what the head must fit; config.json and the
    weights' shapes are checked against it and each other before any module is built (models/checks.py)."""
    path = Path(path)
    raw, where = read_config_json(path), str(path)
    target = TargetShape.coerce(target)
    if raw.get("draftsmith_kind") == "eagle3":
        return (PEagleHead if raw.get("parallel") else Eagle3Head).from_pretrained(path, target)
    if raw.get("draftsmith_kind") == "eagle":
        return EagleHead.from_pretrained(path, target)
    if raw.get("draftsmith_kind") in BLOCK_HEADS:
        return BLOCK_HEADS[raw["draftsmith_kind"]].from_pretrained(path, target)
    drop = ("embed_tokens.", "verifier", "lm_head.", "model.embed_tokens.")
    if raw.get("speculators_model_type") == "eagle":   # written by draftsmith before 0.9.0 refused it
        if raw.get("layernorms"):
            raise DraftsmithError("draftsmith serves the EAGLE-1 layout (speculators layernorms: false)",
                                  "layernorms: true", "Use an eagle3 speculator or an EAGLE-1/2 checkpoint")
        c = _config_from_llama(raw.get("transformer_layer_config") or {}, where, cls=EagleConfig)
        state = checked_state(EagleHead, c, path, target, optional=("fc.bias",), rename=lambda k: None
                              if k.startswith(drop) else k.replace("fusion_fc.", "fc.", 1).replace("transformer.", "layers.0.", 1))
        state.setdefault("fc.bias", torch.zeros(c.hidden_size, dtype=state["fc.weight"].dtype))
        return EagleHead.from_state(c, state, where)
    if "LlamaForCausalLMEagle" in (raw.get("architectures") or []):
        c = _config_from_llama(raw, where, cls=EagleConfig)
        state = checked_state(EagleHead, c, path, target,
                              rename=lambda k: None if k.removeprefix("model.").startswith(drop) else k.removeprefix("model."))
        return EagleHead.from_state(c, state, where)
    if raw.get("speculators_model_type") in SPECULATORS_TYPES:     # dflash, dspark (models/block_formats.py)
        return read_block_speculators(raw, path, target, config_from_llama=_config_from_llama)
    if "speculators_model_type" in raw:
        if raw["speculators_model_type"] not in ("eagle3", "peagle"):
            raise DraftsmithError("draftsmith reads speculators checkpoints of types eagle3, peagle, dflash and dspark "
                                  "(and EAGLE-1 ones it wrote)", raw["speculators_model_type"],
                                  "Use an eagle3, peagle, dflash or dspark speculator")
        layer = raw.get("transformer_layer_config") or {}
        if layer.get("num_hidden_layers", 1) != 1:
            raise DraftsmithError("draftsmith reads EAGLE-3 speculators with one decoder layer",
                                  f"{where}: num_hidden_layers {layer.get('num_hidden_layers')}",
                                  "Use a one-layer EAGLE-3 speculator")
        ids = _layer_ids(raw, "eagle_aux_hidden_state_layer_ids", where)
        common = dict(draft_vocab_size=raw.get("draft_vocab_size"), aux_layers=[i - 1 for i in ids],
                      target_hidden_size=raw.get("target_hidden_size") or layer.get("hidden_size"),
                      norm_before_residual=bool(raw.get("norm_before_residual", False)))
        if raw["speculators_model_type"] == "peagle":
            return _read_peagle(raw, layer, path, target, common)
        c = _config_from_llama(layer, where, **common)
        state = checked_state(Eagle3Head, c, path, target,
                              rename=lambda k: None if k.startswith(("embed_tokens.", "verifier")) else k)
        return Eagle3Head.from_state(c, state, where)
    if "LlamaForCausalLMEagle3" in (raw.get("architectures") or []):
        if (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") is None:
            if target.num_layers is None:
                raise DraftsmithError("This SGLang EAGLE-3 config names no aux layers", where,
                                      "Load it against a target (SGLang's default is 2, N/2, N-3 before-layer)")
            n = target.num_layers
            ids = [2 - 1, n // 2 - 1, n - 3 - 1]
        else:
            ids = _layer_ids(raw["eagle_config"], "eagle_aux_hidden_state_layer_ids", where)
        c = _config_from_llama(raw, where, draft_vocab_size=raw.get("draft_vocab_size") or raw.get("vocab_size"),
                               aux_layers=list(ids), target_hidden_size=raw.get("target_hidden_size") or raw.get("hidden_size"))

        def rename(k: str) -> str | None:
            k = k.removeprefix("model.").replace("midlayer.", "layers.0.", 1)
            return None if k.startswith("embed_tokens.") else k

        return Eagle3Head.from_state(c, checked_state(Eagle3Head, c, path, target, rename=rename), where)
    return None


def _read_peagle(raw: dict, layer: dict, path: Path, target: TargetShape, common: dict) -> PEagleHead:
    """A speculators `peagle` folder: the EAGLE-3 tensors, mask_hidden, and the mask token's row of
    embed_tokens as the head's mask_embedding. The whole table rides along (`embedding_table`): the
    proposer uses it where it differs from the target's (a P-EAGLE that trained its embeddings)."""
    where = str(path)
    mask_id = raw.get("mask_token_id")
    methods = (raw.get("speculators_config") or {}).get("proposal_methods") or [{}]
    k = methods[0].get("speculative_tokens") if isinstance(methods[0], dict) else None
    for key, value in (("mask_token_id", mask_id), ("speculative_tokens", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DraftsmithError(f"This peagle checkpoint's config.json has no valid {key}", f"{where}: {value!r}",
                                  "Re-export the drafter, or check its config.json against docs/formats.md")
    c = _config_from_llama(layer, where, cls=PEagleConfig, **common, parallel_k=max(1, k), mask_token_id=mask_id)
    state = checked_state(PEagleHead, c, path, target, optional=("mask_embedding",),
                          rename=lambda k: None if k.startswith(("embed_tokens.", "verifier")) else k)
    shape = weight_shapes(path).get("embed_tokens.weight")
    if tuple(shape or ()) != (c.vocab_size, c.hidden_size):
        raise DraftsmithError("A peagle checkpoint must carry embed_tokens.weight [vocab, hidden]: its mask token's "
                              "embedding is learnt and lives there", f"{where}: {shape}",
                              "Re-export it with draftsmith export --format speculators")
    table = load_weights(path)["embed_tokens.weight"]
    state["mask_embedding"] = table[c.mask_token_id]
    head = PEagleHead.from_state(c, state, where)
    head.embedding_table = table
    return head


BLOCK_HEADS = {"dflash": DFlashHead, "dspark": DSparkHead}
"""The block drafters' head classes by draftsmith kind (models/block_drafter.py)."""


def proposer_for(head, target_model):
    if isinstance(head, BlockHead):
        return BlockProposer(head, target_model)
    if isinstance(head, PEagleHead):
        return PEagleProposer(head, target_model)
    return (Eagle3Proposer if isinstance(head, Eagle3Head) else EagleProposer)(head, target_model)
