"""The rows a run trains on: its data source tokenised (distill/data.py) and split by conversation,
or a prepared folder (train/prepared.py) as it is; `draftsmith data prepare` writes the latter.

    draftsmith data prepare smollm2-135m/eagle3-ttt --out data/sharegpt-smollm2
"""

from __future__ import annotations

import json
from pathlib import Path

from draftsmith.distill.data import build_dataset, tokenizer_fingerprint
from draftsmith.distill.sources import load_conversations
from draftsmith.errors import DraftsmithError
from draftsmith.folders import check_output_folder, prepare_output_folder
from draftsmith.models.target import cache_root, load_target
from draftsmith.splits import split_conversations
from draftsmith.train.config import load_recipe, resolve_recipe_path
from draftsmith.train.prepared import FORMAT, SETTINGS, is_prepared, load_prepared, write_rows


def load_data(cfg, tokenizer):
    """Tokenised train and held-out rows; the split is by conversation and stable across runs.
    A prepared folder (`draftsmith data prepare`) gives its rows as they are."""
    if is_prepared(cfg.data.source):
        return load_prepared(cfg, tokenizer)
    conversations = load_conversations(cfg.data.source, cfg.data.max_malformed_fraction)
    train, heldout = split_conversations(conversations, cfg.data.heldout_fraction)
    if cfg.data.max_conversations is not None:
        train = train[: cfg.data.max_conversations]
    if not train or not heldout:
        raise DraftsmithError("The data split left no training or no held-out conversations",
                              f"{len(train)} train / {len(heldout)} held out",
                              "Use more data or change data.heldout_fraction")
    cache = cfg.data.cache_dir or str(cache_root() / "data")
    train_rows = build_dataset(train, tokenizer, cfg.data.max_length, cache_dir=cache, packing=cfg.data.packing)
    heldout_rows = build_dataset(heldout, tokenizer, cfg.data.max_length, cache_dir=cache, packing=False)
    return train_rows, heldout_rows


def prepare(recipe: str, overrides: list[str], out: str, overwrite: bool = False) -> dict:
    """Tokenise a recipe's data (its target's tokenizer, its data section) into `out`."""
    cfg = load_recipe(resolve_recipe_path(recipe), overrides)
    if is_prepared(cfg.data.source):
        raise DraftsmithError("data.source is already prepared data", cfg.data.source,
                              "Point data.source at raw data: sharegpt, a .jsonl file or a saved dataset folder")
    protect = [Path(cfg.data.source)] if Path(cfg.data.source).exists() else []
    check_output_folder(out, overwrite, "data", protect=protect)    # before the (long) tokenisation
    target = load_target(cfg.target.name, "fp32", device="cpu")
    train_rows, heldout_rows = load_data(cfg, target.tokenizer)
    folder = prepare_output_folder(out, overwrite, "data", protect=protect)
    meta = {"format": FORMAT, "source": cfg.data.source, "target": cfg.target.name,
            "tokenizer": tokenizer_fingerprint(target.tokenizer), "vocab_size": len(target.tokenizer),
            **{key: getattr(cfg.data, key) for key in SETTINGS},
            "train": write_rows(train_rows, folder / "train.npz"),
            "heldout": write_rows(heldout_rows, folder / "heldout.npz")}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
