"""vLLM speculators' `dflash` / `dspark` checkpoints of the block drafters (models/block_drafter.py):
written by `draftsmith export --format speculators`, read back by models/formats.py's read_head_folder.

speculators 0.9.0 (DFlashDraftModel / DSparkDraftModel, what vLLM loads) is the authority. Its tensor
names are draftsmith's own (fc, hidden_norm, layers.{i}.<Qwen3 layer>, norm, lm_head, d2t, t2d, and for
dspark markov_head.markov_w{1,2}, confidence_head.proj), so the checkpoint is the head's state dict
with three changes:

- the tapped layers in layer order (vLLM captures them in that order), fc's column blocks permuted to
  match; a layer tapped twice (tiny targets) is tapped once, its blocks summed (fc is linear: the same
  drafts);
- `aux_hidden_state_layer_ids` = draftsmith's output ids + 1: speculators counts transformers'
  hidden_states index (z-lab's `target_layer_ids` + 1, its DFlash converter says; vLLM maps them back
  with `target_layer_ids = [i - 1 for i in aux_hidden_state_layer_ids]`);
- no embed_tokens (speculators' DFlash overwrites it from the verifier on every load and never saves it);
  no d2t / t2d when the draft vocabulary is the whole vocabulary (speculators then has no such buffers).

This module imports nothing of models/formats.py (which imports it): the helpers the two share stay
there and are passed in (`speculators_config`, `config_from_llama`). docs/formats.md documents every field.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.models.block_drafter import BlockHead
from draftsmith.models.checks import TargetShape, checked_state
from draftsmith.models.dflash import DFlashConfig, DFlashHead
from draftsmith.models.dspark import DSparkConfig, DSparkHead

SPECULATORS_TYPES = {"dflash": (DFlashHead, DFlashConfig, "DFlashSpeculator"),
                     "dspark": (DSparkHead, DSparkConfig, "DSparkSpeculator")}
"""speculators_model_type -> (draftsmith head class, its config class, speculators' architecture)."""

_REEXPORT = "Re-export the drafter with draftsmith export --format speculators, or check its config.json " \
            "against docs/formats.md"


def layer_config(c, dtype: str) -> dict:
    """speculators' `transformer_layer_config` for a block head: a Qwen3Config dict (speculators builds
    Qwen3DFlashDecoderLayer from it whatever the target's family; model_type qwen3 is also what z-lab's
    DFlash checkpoints and vLLM's Qwen3 DFlash model read). num_hidden_layers = the draft layers."""
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    return {
        "model_type": "qwen3", "hidden_act": "silu", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_parameters": rope,
        "max_position_embeddings": 32768, "vocab_size": c.vocab_size, "attention_bias": False,
        "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
        "layer_types": ["full_attention"] * c.num_layers, "tie_word_embeddings": False,
    }


def taps_in_layer_order(head: BlockHead) -> tuple[list[int], torch.Tensor]:
    """(the tapped layers ascending and distinct, fc.weight with its column blocks to match): a layer
    tapped twice gets the sum of its blocks, which computes the same features."""
    c = head.config
    width = c.target_hidden_size or c.hidden_size
    merged: dict[int, torch.Tensor] = {}
    for layer, block in zip(c.aux_layers, head.fc.weight.detach().split(width, dim=1)):
        merged[layer] = merged[layer] + block if layer in merged else block
    layers = sorted(merged)
    return layers, torch.cat([merged[i] for i in layers], dim=1)


def full_vocabulary(head: BlockHead) -> bool:
    """The draft vocabulary is the whole target vocabulary, in order (speculators keeps no d2t / t2d then)."""
    c = head.config
    return c.draft_vocab_size == c.vocab_size and not bool(head.d2t.any())


def write_block_speculators(head: BlockHead, out: Path, verifier: str, verifier_arch: list[str], *,
                            speculators_config, version: str) -> None:
    """A dflash / dspark head as speculators' `dflash` / `dspark` checkpoint (config.json + model.safetensors).
    `verifier`: the target's hub id or local folder (speculators fetches its embedding, LM head and final
    norm from it); `speculators_config(algorithm, verifier, verifier_arch, k)`: formats.py's builder of the
    `speculators_config` block; `version`: the speculators release the layout is checked against."""
    from safetensors.torch import save_file

    c = head.config
    kind = "dspark" if isinstance(head, DSparkHead) else "dflash"
    if c.target_hidden_size not in (0, c.hidden_size):
        raise DraftsmithError("speculators sizes a DFlash fc by the draft's hidden_size, so a block head narrower or "
                              "wider than its target has no speculators layout",
                              f"hidden_size {c.hidden_size}, target_hidden_size {c.target_hidden_size}",
                              "Train the block drafter at the target's width (drafter.hidden_size: null), or "
                              "export it with --format hf (draftsmith eval)")
    layers, fc = taps_in_layer_order(head)
    state = dict(head.state_dict())
    state["fc.weight"] = fc
    if full_vocabulary(head):
        del state["d2t"], state["t2d"]
    dtype = str(head.fc.weight.dtype).removeprefix("torch.")
    config = {
        "speculators_model_type": kind,
        "architectures": [SPECULATORS_TYPES[kind][2]],
        "transformer_layer_config": layer_config(c, dtype),
        "draft_vocab_size": c.draft_vocab_size,
        "block_size": c.block_size,
        "target_hidden_size": c.target_hidden_size or c.hidden_size,
        "aux_hidden_state_layer_ids": [i + 1 for i in layers],
        "mask_token_id": c.mask_token_id,
        # the draft has no sliding-window layer, so speculators ignores this; vLLM's loader turns it into
        # dflash_config.causal = not it, and a causal block is not what was trained: true keeps it non-causal
        "sliding_window_non_causal": True,
        "sample_from_anchor": c.sample_from_anchor,
    }
    if kind == "dspark":
        config.update(markov_rank=c.markov_rank, markov_head_type="vanilla", enable_confidence_head=c.confidence_head,
                      confidence_head_with_markov=c.confidence_with_markov)
    # speculative_tokens: speculators' rule, block_size, or block_size - 1 when the anchor slot drafts nothing
    config.update(speculators_config=speculators_config(kind, verifier, verifier_arch, c.drafts),
                  speculators_version=version, torch_dtype=dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "model.safetensors"))


# ---------------------------------------------------------------------------------------- reading

def _field(raw: dict, key: str, where: str, kind: type, default=None, check=None, fix: str = _REEXPORT):
    value = raw.get(key, default)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok or (check is not None and not check(value)):
        raise DraftsmithError(f"The block drafter's config.json has no valid {key}",
                              f"{where}: {value!r}", fix)
    return value


def read_block_speculators(raw: dict, path: Path, target: TargetShape | int | None = None, *, config_from_llama):
    """A DFlashHead / DSparkHead from a speculators `dflash` / `dspark` folder whose config.json is `raw`.
    The config is checked field by field, then against `target` and the weights' shapes (checked_state)
    before any module is built. `config_from_llama(layer, where, cls=..., **extra)`: formats.py's reader of
    a Llama-style layer config."""
    path, where = Path(path), str(path)
    kind = raw.get("speculators_model_type")
    if kind not in SPECULATORS_TYPES:
        raise DraftsmithError("Not a speculators block drafter (dflash, dspark)", f"{where}: {kind!r}", _REEXPORT)
    cls, config_cls, _ = SPECULATORS_TYPES[kind]
    layer = raw.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise DraftsmithError("The drafter's config.json needs transformer_layer_config (an object)",
                              f"{where}: {layer!r}", _REEXPORT)
    rope, types = layer.get("rope_parameters"), layer.get("layer_types")
    unsupported = [(key, layer.get(key), fix) for key, ok, fix in (
        ("attention_bias", not layer.get("attention_bias"), "draftsmith's draft layers have no biases"),
        ("hidden_act", layer.get("hidden_act", "silu") == "silu", "draftsmith's draft MLP is SwiGLU (silu)"),
        ("layer_types", types is None or (isinstance(types, list) and all(t == "full_attention" for t in types)),
         "draftsmith's draft layers attend to the whole context (no sliding window)"),
        ("rope_parameters", (rope is None or (isinstance(rope, dict) and rope.get("rope_type", "default") == "default"))
         and not layer.get("rope_scaling"), "draftsmith's draft layers use plain RoPE (rope_type default)"),
    ) if not ok]
    if kind == "dspark" and raw.get("markov_head_type", "vanilla") != "vanilla":
        unsupported.append(("markov_head_type", raw["markov_head_type"], "draftsmith's Markov head is the vanilla one"))
    if unsupported:
        key, value, fix = unsupported[0]
        raise DraftsmithError(f"draftsmith cannot draft with this {kind} checkpoint's {key}", f"{where}: {value!r}",
                              f"{fix}; use speculators / vLLM for it")
    ids = _field(raw, "aux_hidden_state_layer_ids", where, list,
                 check=lambda v: bool(v) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in v)
                 and len(set(v)) == len(v),
                 fix="Give distinct layer ids >= 1 (speculators counts transformers' hidden_states: id i is the "
                     "output of decoder layer i - 1; id 0, the embedding, is not a tap draftsmith reads)")
    num_layers = _field(layer, "num_hidden_layers", where, int, check=lambda v: v >= 1,
                        fix="transformer_layer_config.num_hidden_layers is the number of draft layers (>= 1)")
    mask = _field(raw, "mask_token_id", where, int, check=lambda v: v >= 0,
                  fix="A block drafter needs its mask token id (a target id >= 0); set mask_token_id")
    hidden = layer.get("hidden_size")
    target_hidden = raw.get("target_hidden_size") or hidden
    if target_hidden != hidden:
        raise DraftsmithError("speculators' DFlash sizes fc by the draft's hidden_size: target_hidden_size must "
                              "equal transformer_layer_config.hidden_size", f"{where}: {target_hidden} vs {hidden}",
                              _REEXPORT)
    extra = dict(num_layers=num_layers, block_size=raw.get("block_size", 8),
                 draft_vocab_size=raw.get("draft_vocab_size"), aux_layers=[i - 1 for i in ids], target_hidden_size=target_hidden, mask_token_id=mask,
                 sample_from_anchor=raw.get("sample_from_anchor", kind == "dspark"))
    if kind == "dspark":
        extra.update(markov_rank=raw.get("markov_rank", 256), confidence_head=raw.get("enable_confidence_head", True),
                     confidence_with_markov=raw.get("confidence_head_with_markov", True))
    c = config_from_llama(layer, where, cls=config_cls, **extra)
    # types and ranges (block_size, mask_token_id, draft_vocab_size, ...), the target, the weights' shapes
    state = checked_state(cls, c, path, target, optional=("lm_head.weight",),
                          rename=lambda k: None if k.startswith(("embed_tokens.", "verifier_")) else k)
    if "lm_head.weight" not in state:
        raise DraftsmithError(f"This {kind} checkpoint has no lm_head.weight: speculators leaves a full-vocabulary "
                              "draft's LM head to the verifier", where,
                              "Add the target's lm_head.weight [vocab, hidden] to model.safetensors, or re-export "
                              "the drafter with draftsmith export --format speculators (which always writes it)")
    if c.draft_vocab_size == c.vocab_size and "d2t" not in state and "t2d" not in state:
        state["d2t"] = torch.zeros(c.vocab_size, dtype=torch.long)     # speculators' full vocabulary: no maps
        state["t2d"] = torch.ones(c.vocab_size, dtype=torch.bool)
    return cls.from_state(c, state, where)

