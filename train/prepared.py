"""Prepared (pre-tokenised) training data: tokenise once where the raw data is, train where the GPUs are.

    draftsmith data prepare smollm2-135m/eagle3-ttt --out data/sharegpt-smollm2 [section.key=value ...]
    draftsmith train smollm2-135m/eagle3-ttt data.source=data/sharegpt-smollm2

The folder holds `meta.json` and `train.npz` / `heldout.npz`: every row's token ids concatenated
(uint16 when the vocabulary fits, else uint32), the row offsets, and the loss mask as packed bits,
zlib-compressed (~1.5 bytes per token). A run on it needs neither the raw data nor `datasets`, and
it refuses a folder tokenised with another tokenizer or with other data settings.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from draftsmith.distill.data import tokenizer_fingerprint
from draftsmith.errors import DraftsmithError

FORMAT = "draftsmith-tokens/1"
# the data settings that decide the rows: a run on a prepared folder must agree on each
SETTINGS = ("max_length", "packing", "heldout_fraction", "max_conversations")


class TokenRows:
    """Rows {"input_ids": int64 array, "loss_mask": bool array}, indexable like the tokenised dataset."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray):
        self.ids, self.mask, self.offsets = ids, mask, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        a, b = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.ids[a:b].astype(np.int64), "loss_mask": self.mask[a:b]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def write_rows(rows, path: Path) -> dict:
    """Save rows (anything yielding input_ids / loss_mask) to one compressed .npz; returns counts."""
    ids = [np.asarray(r["input_ids"], dtype=np.int64) for r in rows]
    masks = [np.asarray(r["loss_mask"], dtype=bool) for r in rows]
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    dtype = np.uint16 if flat.size == 0 or flat.max() < 2**16 else np.uint32
    np.savez_compressed(path, input_ids=flat.astype(dtype), loss_mask=np.packbits(mask), offsets=offsets)
    return {"rows": len(ids), "tokens": int(flat.size), "assistant_tokens": int(mask.sum())}


def read_rows(path: Path, vocab_size: int | None = None) -> TokenRows:
    """The rows of one .npz, read without pickles and checked whole: a damaged or crafted file (bad zip,
    offsets past the tokens, ids outside the vocabulary) is refused by name, never read out of bounds."""
    try:
        with np.load(path, allow_pickle=False) as f:   # an .npz may hold pickled object arrays: never load them
            ids, packed, offsets = f["input_ids"], f["loss_mask"], f["offsets"]
        why = _rows_problem(ids, packed, offsets, vocab_size)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        why = f"{type(err).__name__}: {err}"
    if why is not None:
        raise DraftsmithError(f"The prepared data's token file {Path(path).name} cannot be read: {why}", str(path),
                              "Prepare the data again with `draftsmith data prepare`")
    mask = np.unpackbits(packed, count=len(ids)).astype(bool)
    return TokenRows(ids, mask, offsets)


def _rows_problem(ids: np.ndarray, packed: np.ndarray, offsets: np.ndarray, vocab_size: int | None) -> str | None:
    if ids.ndim != 1 or ids.dtype not in (np.uint16, np.uint32) or packed.ndim != 1 or packed.dtype != np.uint8:
        return f"input_ids {ids.dtype} {ids.shape} / loss_mask {packed.dtype} {packed.shape} are not as written"
    if len(packed) != -(-len(ids) // 8):
        return f"the loss mask holds {len(packed) * 8} bits for {len(ids)} tokens"
    if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids) \
            or bool((np.diff(offsets) < 0).any()):
        return f"its row offsets do not split its {len(ids)} tokens into rows"
    if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
        return f"token id {int(ids.max())} is outside the vocabulary ({vocab_size} tokens)"
    return None


def is_prepared(source: str) -> bool:
    return (Path(source) / "meta.json").is_file()


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((Path(folder) / "meta.json").read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DraftsmithError("The prepared data's meta.json is not valid JSON", f"{folder}: {err}",
                              "Prepare the data again with `draftsmith data prepare`") from None
    missing = [name for name in ("train.npz", "heldout.npz") if not (Path(folder) / name).is_file()]
    if missing:
        raise DraftsmithError("The prepared data folder is incomplete", f"{folder}: no {', '.join(missing)}",
                              "Copy the whole folder, or prepare the data again with `draftsmith data prepare`")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DraftsmithError("This folder is not draftsmith prepared data (or another version of it)",
                              f"{folder}: format {meta.get('format') if isinstance(meta, dict) else meta!r}",
                              f"Prepare it again with `draftsmith data prepare` (format {FORMAT})")
    bad = [key for key in ("tokenizer", "vocab_size", "train", "heldout") if key not in meta]
    if bad:
        raise DraftsmithError("The prepared data's meta.json lacks keys", f"{folder}: {', '.join(bad)}",
                              "Prepare the data again with `draftsmith data prepare`")
    return meta


def load_prepared(cfg, tokenizer) -> tuple[TokenRows, TokenRows]:
    """The rows of a prepared folder, after checking they are what this run would tokenise itself."""
    folder = Path(cfg.data.source)
    meta = read_meta(folder)
    mine = tokenizer_fingerprint(tokenizer)
    if meta["tokenizer"] != mine:
        raise DraftsmithError("The prepared data was tokenised with another tokenizer than this run's target",
                              f"{folder}: tokenizer {meta['tokenizer']} (target {meta.get('target')}), "
                              f"this run's {mine} ({cfg.target.name})",
                              "Prepare the data again with this recipe: draftsmith data prepare <recipe> --out DIR")
    differ = {key: (meta.get(key), getattr(cfg.data, key)) for key in SETTINGS if meta.get(key) != getattr(cfg.data, key)}
    if differ:
        raise DraftsmithError("The prepared data was made with other data settings than this run's",
                              ", ".join(f"data.{k}: prepared {a!r}, run {b!r}" for k, (a, b) in differ.items()),
                              "Pass the prepared values as overrides, or prepare the data again")
    vocab = meta["vocab_size"] if isinstance(meta["vocab_size"], int) else None
    splits = {split: read_rows(folder / f"{split}.npz", vocab) for split in ("train", "heldout")}
    for split, rows in splits.items():   # a file from another preparation, or cut at a row boundary
        counts = meta[split] if isinstance(meta[split], dict) else {}
        if (len(rows), rows.num_tokens) != (counts.get("rows"), counts.get("tokens")):
            raise DraftsmithError(f"The prepared data's {split}.npz holds other rows than its meta.json counts",
                                  f"{folder / f'{split}.npz'}: {len(rows)} rows, {rows.num_tokens} tokens; meta.json: "
                                  f"{counts.get('rows')} rows, {counts.get('tokens')} tokens",
                                  "Prepare the data again with `draftsmith data prepare`")
    return splits["train"], splits["heldout"]
