"""The files of a teacher cache (`draftsmith data cache`), checked before a run trains on them.

manifest.json holds the plan (layers, widths, rows and shards per split) and, as each shard is written,
its size and sha256 under "files" and "sha256" (as a checkpoint's meta.json does). A cache is trusted
only when every planned shard is there at its size and sha256, holds exactly the tensors its plan
implies at their shapes, its row offsets are those of the run's own rows and its token ids lie in the
vocabulary; anything else is refused with the shard named. A cache written before shards were hashed
cannot be checked and is refused: rebuild it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.folders import sha256_of

FORMAT = "draftsmith-teacher-cache/1"
REBUILD = "Write the cache again: draftsmith data cache <recipe> --out DIR --overwrite"
_SPLITS = ("train", "heldout")


def shard_name(split: str, index: int) -> str:
    return f"{split}/{index:05d}.safetensors"


def read_manifest(folder: Path) -> dict:
    """manifest.json of a cache folder, its format and plan checked (a finished cache or not)."""
    path = Path(folder) / "manifest.json"
    if path.is_symlink() or not path.is_file():
        raise DraftsmithError("data.teacher names no teacher cache (no manifest.json)", str(folder),
                              "Write one with: draftsmith data cache <recipe> --out DIR, then data.teacher=cache:DIR")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DraftsmithError("The teacher cache's manifest.json is not valid JSON", f"{path}: {err}",
                              REBUILD) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DraftsmithError("This folder is not a draftsmith teacher cache (or another version of one)",
                              f"{folder}: format {found!r}",
                              f"Write it again with draftsmith data cache (format {FORMAT})")
    why = _plan_problem(manifest.get("plan"))
    if why is None and not all(isinstance(manifest.get(key, {}), dict) for key in ("files", "sha256")):
        why = "its files and sha256 are not mappings"
    if why is not None:
        raise DraftsmithError("The teacher cache's manifest.json is damaged", f"{path}: {why}", REBUILD)
    return manifest


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _plan_problem(plan) -> str | None:
    """What is missing or malformed in a manifest's plan (None: nothing)."""
    if not isinstance(plan, dict):
        return "no plan"
    missing = [k for k in ("target", "tokenizer", "arch", "layers", "top_k", "exact", "splits") if k not in plan]
    if missing:
        return f"the plan lacks {', '.join(missing)}"
    arch = plan["arch"]
    if not isinstance(arch, dict) or not all(_is_int(arch.get(k), 1) for k in ("hidden_size", "num_hidden_layers",
                                                                                 "vocab_size")):
        return f"arch {arch!r}"
    if not isinstance(plan["layers"], list) or not all(_is_int(j) and j < arch["num_hidden_layers"]
                                                       for j in plan["layers"]):
        return f"layers {plan['layers']!r}"
    if not _is_int(plan["top_k"], 1) or not isinstance(plan["exact"], bool):
        return f"top_k {plan['top_k']!r}, exact {plan['exact']!r}"
    splits = plan["splits"]
    if not isinstance(splits, dict) or sorted(splits) != sorted(_SPLITS):
        return f"splits {sorted(splits) if isinstance(splits, dict) else splits!r} (expected {list(_SPLITS)})"
    for name, split in splits.items():
        if not isinstance(split, dict) or not _is_int(split.get("rows")) or not isinstance(split.get("shards"), list):
            return f"split {name}: no rows and shards"
        ends = [0]
        for shard in split["shards"]:
            if not (isinstance(shard, list) and len(shard) == 2 and all(_is_int(x) for x in shard)
                    and shard[0] == ends[-1] <= shard[1]):
                return f"split {name}: shard {shard!r} does not follow row {ends[-1]}"
            ends.append(shard[1])
        if ends[-1] != split["rows"] or not split["shards"]:
            return f"split {name}: its shards cover {ends[-1]} of {split['rows']} rows"
    return None


def record_shard(manifest: dict, folder: Path, split: str, index: int) -> None:
    """Note a written shard's size and sha256 in the manifest (the caller writes the manifest)."""
    rel = shard_name(split, index)
    manifest.setdefault("files", {})[rel] = (Path(folder) / rel).stat().st_size
    manifest.setdefault("sha256", {})[rel] = sha256_of(Path(folder) / rel)


def is_recorded(manifest: dict, folder: Path, split: str, index: int) -> bool:
    """A shard written whole: on disk and in the manifest (a kill between the two leaves it to redo)."""
    rel = shard_name(split, index)
    return rel in manifest.get("sha256", {}) and (Path(folder) / rel).is_file()


def verify_cache(folder: Path, manifest: dict, split: str, lengths: list[int], trained: list[int]) -> None:
    """Every shard of a split against the manifest and the run's rows (`lengths` tokens and `trained`
    positions with loss per row, in order)."""
    plan = manifest["plan"]
    if "sha256" not in manifest:
        raise DraftsmithError("This teacher cache was written before draftsmith hashed its shards: its files "
                              "cannot be checked", str(folder), REBUILD)
    for index, (a, b) in enumerate(plan["splits"][split]["shards"]):
        _verify_shard(Path(folder), manifest, shard_name(split, index), lengths[a:b], trained[a:b])


def _offsets(counts: list[int]) -> list[int]:
    out = [0]
    for n in counts:
        out.append(out[-1] + n)
    return out


def _verify_shard(folder: Path, manifest: dict, rel: str, lengths: list[int], trained: list[int]) -> None:
    from safetensors import safe_open

    path, plan = folder / rel, manifest["plan"]

    def bad(why: str) -> DraftsmithError:
        return DraftsmithError(f"Teacher-cache shard {rel} {why}", str(path), REBUILD)

    if path.is_symlink() or not path.is_file():
        raise bad("is missing (or not a regular file)")
    size, want = path.stat().st_size, manifest["files"].get(rel)
    if size != want:
        raise bad(f"has {size} bytes where manifest.json says {want} (truncated or replaced)")
    if sha256_of(path) != manifest["sha256"].get(rel):
        raise bad("does not match its sha256 in manifest.json (the file was modified or damaged)")
    tokens, positions = _offsets(lengths), _offsets(trained)
    n, m, vocab = tokens[-1], positions[-1], plan["arch"]["vocab_size"]
    logits = {"logp": ((m, vocab), "F32")} if plan["exact"] else {
        "topk_logp": ((m, plan["top_k"]), "F32"), "topk_ids": ((m, plan["top_k"]), "I32"), "rest": ((m,), "F32")}
    expected = {"token_offsets": ((len(tokens),), "I64"), "trained_offsets": ((len(tokens),), "I64"), **logits,
                **{f"hidden.{j}": ((n, plan["arch"]["hidden_size"]), None) for j in plan["layers"]}}
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in handle.keys()}
            wrong = sorted(k for k in found.keys() | expected.keys() if k not in found or k not in expected
                           or found[k][0] != expected[k][0] or expected[k][1] not in (None, found[k][1]))
            if wrong:
                raise bad(f"holds other tensors than its plan ({', '.join(wrong[:4])})")
            if any(found[k][1] not in ("F32", "F16", "BF16") for k in found if k.startswith("hidden.")):
                raise bad("holds hidden states that are not floating point")
            for name, want in (("token_offsets", tokens), ("trained_offsets", positions)):
                if handle.get_tensor(name).tolist() != want:
                    raise bad(f"has {name} that are not its rows' (they must start at 0 and count each row's tokens)")
            ids = handle.get_tensor("topk_ids") if "topk_ids" in found else torch.zeros(0)
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
                raise bad(f"has token ids outside the vocabulary [0, {vocab})")
    except DraftsmithError:
        raise
    except Exception as err:   # noqa: BLE001 - safetensors' own errors on a garbled file
        raise bad(f"is not a readable safetensors file ({err})") from None
