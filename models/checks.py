"""Checks on a drafter folder before any module is built from it.

A drafter folder is untrusted input: its config.json decides how much memory a module takes, so it is
read strictly (valid JSON, known keys, positive sizes), compared with the target (widths, vocabulary,
layers), and the tensors its weights file declares are compared with the ones that config implies —
from the safetensors header JSON alone (no tensor is read) and a module built on the meta device (no
memory). A folder declaring hidden_size 65536 is refused here, before 64 GiB are allocated.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from draftsmith.errors import DraftsmithError

_MAX_HEADER = 100 * 2**20    # safetensors' own limit on the header JSON
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_REEXPORT = "Re-export the drafter with draftsmith export, or point at another folder"


@dataclass(frozen=True)
class TargetShape:
    """What a drafter must fit: the target's hidden width, vocabulary and decoder layers (None: unknown)."""

    hidden_size: int | None = None
    vocab_size: int | None = None
    num_layers: int | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> "TargetShape":
        return cls(model.config.hidden_size, model.get_output_embeddings().weight.shape[0],
                   model.config.num_hidden_layers)

    @classmethod
    def coerce(cls, target: "TargetShape | int | None") -> "TargetShape":
        """An int is a layer count alone (the callers that know only that)."""
        return target if isinstance(target, TargetShape) else cls(num_layers=target)


def read_config_json(folder: Path) -> dict:
    """config.json of a drafter folder as a dict, or a clear error (binary, invalid JSON, not an object)."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise DraftsmithError("This drafter folder has no config.json (a regular file)", str(folder), _REEXPORT)
    if file.stat().st_size > _MAX_HEADER:   # a config is a few kB; do not read a planted giant
        raise DraftsmithError("The drafter's config.json is too large to be a config", file.stat().st_size, _REEXPORT)
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise DraftsmithError("The drafter's config.json is not valid JSON", f"{file}: {err}", _REEXPORT) from None
    if not isinstance(raw, dict):
        raise DraftsmithError("The drafter's config.json must hold a JSON object", f"{file}: {type(raw).__name__}",
                              _REEXPORT)
    return raw


def config_from_dict(cls, raw: dict, where: str):
    """A head's dataclass config from its config.json: unknown keys, missing keys and wrong types are
    refused by name (a mistyped key would otherwise fall back to a default silently)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise DraftsmithError(f"Unknown key in the drafter's config.json ({where})", unknown[0],
                              f"Valid keys: {', '.join(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in raw]
    if missing:
        raise DraftsmithError(f"The drafter's config.json lacks required keys ({where})", missing, _REEXPORT)
    config = cls(**raw)
    check_head_config(config, where)
    return config


def _bad(where: str, key: str, value, fix: str) -> DraftsmithError:
    return DraftsmithError(f"Invalid {key} in the drafter's config ({where})", value, fix)


def check_head_config(c, where: str) -> None:
    """Types and ranges of an EAGLE / EAGLE-3 head config, before anything is sized by it."""
    ints = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "vocab_size"] + (["draft_vocab_size"] if hasattr(c, "draft_vocab_size") else [])
    for key in ints:
        value = getattr(c, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _bad(where, key, value, "Use a positive integer")
    for key in [k for k in ("rms_norm_eps", "rope_theta", "feature_scale") if hasattr(c, k)]:
        value = getattr(c, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise _bad(where, key, value, "Use a positive number")
    if c.num_attention_heads % c.num_key_value_heads:
        raise _bad(where, "num_key_value_heads", c.num_key_value_heads,
                   f"num_attention_heads ({c.num_attention_heads}) must be a multiple of it")
    if c.head_dim % 2:
        raise _bad(where, "head_dim", c.head_dim, "Rotary embeddings need an even head_dim")
    if hasattr(c, "target_layer") and (not isinstance(c.target_layer, int) or isinstance(c.target_layer, bool)):
        raise _bad(where, "target_layer", c.target_layer, "Use an integer layer index (-1: the last)")
    if not hasattr(c, "aux_layers"):
        return
    if c.draft_vocab_size > c.vocab_size:
        raise _bad(where, "draft_vocab_size", c.draft_vocab_size, f"Use at most vocab_size ({c.vocab_size})")
    layers = c.aux_layers
    ints = isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    count = 3 if c.draftsmith_kind == "eagle3" else None      # block drafters tap any number (DFlash: 5)
    if not ints or not layers or (count and len(layers) != count) or len(layers) > 64 or min(layers) < 0:
        # repeats happen: tiny targets tap one layer twice
        raise _bad(where, "aux_layers", layers, f"Give {count or 'up to 64'} target layer indices >= 0")
    if not isinstance(c.target_hidden_size, int) or isinstance(c.target_hidden_size, bool) or c.target_hidden_size < 0:
        raise _bad(where, "target_hidden_size", c.target_hidden_size, "Use the target's hidden size")
    if hasattr(c, "block_size"):
        _check_block_config(c, where)
        return
    if not hasattr(c, "mask_token_id"):
        return
    if c.parallel is not True:   # a P-EAGLE config (models/peagle.py); plain EAGLE-3 has no such key
        raise _bad(where, "parallel", c.parallel, "A config with mask_token_id is a P-EAGLE head: parallel true")
    for key, low, high in (("parallel_k", 1, None), ("mask_token_id", 0, c.vocab_size - 1)):
        value = getattr(c, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            raise _bad(where, key, value, f"Use an integer in [{low}, {high if high is not None else 'inf'}]")


def _check_block_config(c, where: str) -> None:
    """A block drafter's own keys (models/block_drafter.py, kinds dflash and dspark)."""
    for key, low, high in (("num_layers", 1, 64), ("block_size", 2, 64), ("mask_token_id", 0, c.vocab_size - 1),
                           ("markov_rank", 0, 4096)):
        value = getattr(c, key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise _bad(where, key, value, f"Use an integer in [{low}, {high}]")
    for key in ("sample_from_anchor", "confidence_head", "confidence_with_markov"):
        if hasattr(c, key) and not isinstance(getattr(c, key), bool):
            raise _bad(where, key, getattr(c, key), "Use true or false")


def check_head_fits_target(c, target: TargetShape, where: str) -> None:
    """A head reads the target's embedding and hidden states and maps into its vocabulary: widths,
    vocabulary and tapped layers must be the target's."""
    fix = "This drafter was trained for another target; use it with that target"
    if target.hidden_size is not None:
        widths = {"hidden_size": c.hidden_size}
        if getattr(c, "target_hidden_size", 0):
            widths["target_hidden_size"] = c.target_hidden_size
        for key, value in widths.items():
            if value != target.hidden_size:
                raise DraftsmithError(f"The drafter's {key} differs from the target's hidden size ({where})",
                                      f"{value} vs {target.hidden_size}", fix)
    if target.vocab_size is not None and c.vocab_size != target.vocab_size:
        raise DraftsmithError(f"The drafter's vocabulary (vocab_size) differs from the target's ({where})",
                              f"{c.vocab_size} vs {target.vocab_size}", fix)
    n = target.num_layers
    if n is None:
        return
    # an EAGLE-3 head reads its aux layers; an EAGLE-1 head one layer, counted from the end when negative
    layers = list(c.aux_layers) if hasattr(c, "aux_layers") else [c.target_layer]
    out = [i for i in layers if not (0 <= i < n or (not hasattr(c, "aux_layers") and -n <= i < 0))]
    if out:
        raise DraftsmithError(f"The drafter reads target layers this target does not have ({where})",
                              f"layers {layers}, target has {n}", fix)


def check_lm_fits_target(config, target: TargetShape, where: str) -> None:
    """A small_lm or parallel drafter shares the target's vocabulary (a parallel one plus its mask token's
    row) and must not be larger than the target: a drafter at least as wide or deep as its target cannot
    make decoding faster."""
    if getattr(config, "draftsmith_kind", None) == "parallel":
        check_parallel_config(config, target, where)
        target = dataclasses.replace(target, vocab_size=config.vocab_size)   # V + 1, checked just above
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        value = getattr(config, key, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DraftsmithError(f"Invalid {key} in the drafter's config.json ({where})", value,
                                  "Use a positive integer")
    if target.vocab_size is not None and config.vocab_size != target.vocab_size:
        raise DraftsmithError(f"The drafter's vocabulary ({config.vocab_size} tokens) differs from the target's "
                              f"({target.vocab_size} tokens)", where, "A small_lm drafter must share the target's tokenizer")
    for key, limit in (("hidden_size", target.hidden_size), ("num_hidden_layers", target.num_layers)):
        if limit is not None and getattr(config, key) > limit:
            raise DraftsmithError(f"The drafter's {key} exceeds the target's ({where})",
                                  f"{getattr(config, key)} > {limit}",
                                  "A drafter must be smaller than its target; check the folder")


def check_parallel_config(config, target: TargetShape, where: str) -> None:
    """The keys a parallel (PARD) drafter adds to its transformers config (models/parallel.py): the mask
    token is one row appended after the target's vocabulary, so vocab_size is the target's + 1."""
    keys = ("vocab_size", "draftsmith_target_vocab_size", "draftsmith_mask_token_id")
    for key in keys + ("draftsmith_parallel_k",):
        value = getattr(config, key, None)
        if (value is None and key == "draftsmith_parallel_k") or (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            continue
        raise DraftsmithError(f"Invalid {key} in the parallel drafter's config.json ({where})", value,
                              "Use a positive integer. " + _REEXPORT)
    vocab, own, mask = (getattr(config, key) for key in keys)
    if target.vocab_size is not None and own != target.vocab_size:
        raise DraftsmithError(f"The parallel drafter was trained for another vocabulary ({where})",
                              f"{own} tokens, target {target.vocab_size}",
                              "A parallel drafter must share the target's tokenizer")
    if mask != own or vocab != own + 1:
        raise DraftsmithError(f"The parallel drafter's mask token must be the one row after the target's "
                              f"vocabulary ({where})", f"draftsmith_mask_token_id {mask}, vocab_size {vocab}, "
                              f"draftsmith_target_vocab_size {own}", _REEXPORT)


# ------------------------------------------------------------------------------- weight files

def weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise DraftsmithError("No weights in this drafter folder", str(folder),
                          "Expected model.safetensors or pytorch_model.bin beside config.json")


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header JSON; a truncated or garbled file is refused
    here (its header, or a tensor's bytes, pointing past the end of the file)."""
    size = file.stat().st_size

    def broken(why: str) -> DraftsmithError:
        return DraftsmithError(f"The weights file is damaged: {why}", str(file), _REEXPORT)

    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise broken("shorter than a safetensors header")
        n = struct.unpack("<Q", prefix)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise broken(f"its header claims {n} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise broken("its header is not JSON") from None
    if not isinstance(header, dict):
        raise broken("its header is not a JSON object")
    data, shapes = size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (start, end), dtype = tuple(int(d) for d in info["shape"]), info["data_offsets"], info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise broken(f"tensor {name!r} has no valid shape, dtype and offsets") from None
        count = 1
        for d in shape:
            count *= d
        if min(shape, default=1) < 0 or not 0 <= start <= end <= data or (
                dtype in _DTYPE_BYTES and end - start != count * _DTYPE_BYTES[dtype]):
            raise broken(f"tensor {name!r} {list(shape)} {dtype} does not fit bytes {start}..{end} of {data}")
        shapes[name] = shape
    return shapes


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a drafter folder's weights (shards merged), reading no tensor data."""
    shards = sorted(Path(folder).glob("model-*-of-*.safetensors"))
    if shards and not (Path(folder) / "model.safetensors").is_file():
        return {k: v for shard in shards for k, v in safetensors_shapes(shard).items()}
    file = weights_file(folder)
    if file.suffix == ".safetensors":
        return safetensors_shapes(file)
    try:   # weights_only: a restricted unpickler (no code runs); meta: no tensor data is read
        state = torch.load(file, map_location="meta", weights_only=True)
    except Exception as err:   # noqa: BLE001 - any unreadable file gets the same answer
        raise DraftsmithError("The weights file cannot be read as plain tensors", f"{file}: {err}",
                              _REEXPORT) from None
    if not isinstance(state, dict):
        raise DraftsmithError("The weights file holds no state dict", str(file), _REEXPORT)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def meta_shapes(build) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the module `build()` makes, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_shapes(expected: dict, found: dict, where: str, optional: tuple[str, ...] = ()) -> None:
    """The weights file must hold exactly the tensors the config implies, at its shapes."""
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: {list(found[k])} (config: {list(expected[k])})" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        seen = {key: names[:4] for key, names in (("missing", missing), ("unexpected", unexpected),
                                                  ("wrong shape", wrong)) if names}
        raise DraftsmithError(f"The drafter's weights do not match its config.json ({where})", seen,
                              "The folder was edited or mixes two drafters. " + _REEXPORT)


def load_weights(folder: Path) -> dict:
    """The tensors of a drafter folder (after its shapes were checked)."""
    file = weights_file(folder)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def checked_state(cls, config, folder: Path, target: TargetShape | int | None = None, rename=None,
                  optional: tuple[str, ...] = ()) -> dict:
    """The state dict of head class `cls` stored in `folder`, its config and weight shapes checked first.

    `rename` maps a stored tensor name to the head's (None: not the head's, e.g. a verifier tensor);
    `optional` names tensors a layout may leave out (the caller fills or refuses them)."""
    where = str(folder)
    check_head_config(config, where)
    check_head_fits_target(config, TargetShape.coerce(target), where)
    rename = rename or (lambda name: name)
    found = {rename(k): s for k, s in weight_shapes(folder).items() if rename(k) is not None}
    check_shapes(meta_shapes(lambda: cls(config)), found, where, optional + tuple(cls.optional_tensors))
    return {rename(k): v for k, v in load_weights(folder).items() if rename(k) is not None}
