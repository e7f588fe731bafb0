"""`draftsmith data cache`: run the target once over a recipe's data and store what its loss needs.

    draftsmith data cache smollm2-135m/eagle3-ttt-quick --out data/cache-eagle3 [--top-k 64]
    draftsmith train smollm2-135m/eagle3-ttt-quick data.teacher=cache:data/cache-eagle3

The rows are the recipe's own (its data section, tokenizer and split; a prepared folder works as
data.source); the layers are those the recipe's drafter reads (built here to ask it). Per split,
the folder holds <split>/NNNNN.safetensors shards of consecutive rows with
    hidden.<layer>   [tokens, H]   the decoder layer's output at every token of the rows
    logp             [trained, V]  float32 log-softmax, when the cache is exact (k >= V), else
    topk_logp        [trained, k]  float32, topk_ids [trained, k] int32, rest [trained] float32
    token_offsets, trained_offsets [rows + 1]   where each row's slice starts
("trained" positions: those whose next token carries loss). Each shard is written to a temporary
name and renamed, then its size and sha256 go into manifest.json (which holds the plan from the
start), so an interrupted run resumes at the first shard not recorded there; "complete": true marks
a finished cache. Training checks every shard against them first (distill/cache_files.py). The
target runs under the recipe's train.mixed_precision, as it does in an online training step.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from draftsmith.distill.cache_files import FORMAT, is_recorded, read_manifest, record_shard, shard_name
from draftsmith.distill.data import tokenizer_fingerprint
from draftsmith.distill.regenerate import versions
from draftsmith.distill.teacher import architecture, describe_rows
from draftsmith.errors import DraftsmithError
from draftsmith.folders import disk_full_said, prepare_output_folder
from draftsmith.models.lora import adapted_target
from draftsmith.models.target import default_device, load_target, target_signals
from draftsmith.train.config import load_recipe, resolve_recipe_path
from draftsmith.train.data import collate
from draftsmith.train.prepared import SETTINGS
from draftsmith.train.rows import load_data
from draftsmith.train.run import build_drafter
from draftsmith.train.trainer import resolve_mixed_precision

SHARD_BYTES = 256 * 2**20
"""Shard size on disk: large enough to keep file counts low, small enough to lose little on a kill."""
_FREE_SPACE = ("Free some space (or choose an --out on a larger disk), then rerun the same command: it resumes at "
               "the first shard not written")


def bytes_per_token(num_layers: int, hidden_size: int, element_size: int, k: int, vocab: int) -> tuple[int, int]:
    """(hidden-state bytes per token, log-probability bytes per trained position) of a cache."""
    logits = 4 * vocab if k >= vocab else k * (4 + 4) + 4
    return num_layers * hidden_size * element_size, logits


def _plan_shards(lengths: list[int], trained: list[int], hidden_bpt: int, logit_bpt: int) -> list[list[int]]:
    shards, start, size = [], 0, 0
    for i, (n, m) in enumerate(zip(lengths, trained)):
        size += n * hidden_bpt + m * logit_bpt
        if size >= SHARD_BYTES:
            shards.append([start, i + 1])
            start, size = i + 1, 0
    if start < len(lengths) or not shards:
        shards.append([start, len(lengths)])
    return shards


def drafter_layers(cfg, target_model, train_rows, pad: int) -> list[int]:
    """The target layers the recipe's drafter reads (its training module's `target_layers`), 0-based."""
    module = build_drafter(cfg, target_model, train_rows, pad)
    n = target_model.config.num_hidden_layers
    return sorted({j % n for j in getattr(module, "target_layers", ())})


def build_cache(recipe: str, overrides: list[str], out: str, top_k: int = 64, batch_size: int | None = None,
                device: str | None = None, overwrite: bool = False) -> dict:
    """Write (or finish) the teacher cache of a recipe's data into `out`; returns the manifest."""
    if top_k < 1:
        raise DraftsmithError("--top-k must be at least 1", top_k, "e.g. --top-k 64, or the vocabulary size for an exact loss")
    cfg = load_recipe(resolve_recipe_path(recipe), overrides)
    device = device or default_device()
    target = load_target(cfg.target.name, cfg.target.dtype, device=device)
    if getattr(cfg.target, "adapter", None) is not None:      # a LoRA-tuned target: cache what training runs
        target = adapted_target(target, cfg.target.adapter)
    train_rows, heldout_rows = load_data(cfg, target.tokenizer)
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0
    layers = drafter_layers(cfg, target.model, train_rows, pad)
    k = min(top_k, target.vocab_size)
    hidden_size = target.model.config.hidden_size
    element = torch.empty((), dtype=target.dtype).element_size()
    hidden_bpt, logit_bpt = bytes_per_token(len(layers), hidden_size, element, k, target.vocab_size)
    splits = {}
    for split, rows in (("train", train_rows), ("heldout", heldout_rows)):
        described = describe_rows(rows)
        lengths, trained = described.pop("lengths"), described.pop("row_trained")
        splits[split] = {**described, "shards": _plan_shards(lengths, trained, hidden_bpt, logit_bpt)}
    precision = resolve_mixed_precision(cfg.train.mixed_precision, device)
    plan = {"target": cfg.target.name, "arch": architecture(target.model),
            "tokenizer": tokenizer_fingerprint(target.tokenizer), "layers": layers, "top_k": k,
            "exact": k >= target.vocab_size, "hidden_dtype": str(target.dtype).removeprefix("torch."),
            "mixed_precision": precision, "data": {"source": cfg.data.source, **{s: getattr(cfg.data, s) for s in SETTINGS}},
            "splits": splits}
    total = sum(s["tokens"] * hidden_bpt + s["trained"] * logit_bpt for s in splits.values())
    print(f"[draftsmith] teacher cache: {hidden_bpt} bytes per token of hidden states ({len(layers)} layers x "
          f"{hidden_size} x {plan['hidden_dtype']}) + {logit_bpt} bytes per trained position "
          f"({'full log-softmax' if plan['exact'] else f'top-{k} log-probabilities, ids and the rest mass'}); "
          f"{sum(s['tokens'] for s in splits.values())} tokens -> {total / 2**30:.2f} GiB", flush=True)
    folder = Path(out)
    with disk_full_said("the teacher cache's folder could not be written", folder, _FREE_SPACE):
        _open_folder(folder, plan, overwrite)
    manifest = read_manifest(folder)
    rows_of = {"train": train_rows, "heldout": heldout_rows}
    todo = [(split, i, a, b) for split, s in splits.items() for i, (a, b) in enumerate(s["shards"])
            if not is_recorded(manifest, folder, split, i)]
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(b - a for _, _, a, b in todo), unit="row", desc="cache", dynamic_ncols=True)
    start, seen = time.time(), 0

    def progress(rows: int, tokens: int) -> None:
        nonlocal seen
        seen += tokens
        bar.update(rows)
        bar.set_postfix(tok_s=f"{seen / max(time.time() - start, 1e-9):.0f}", refresh=False)

    for split, index, a, b in todo:
        rows = [rows_of[split][i] for i in range(a, b)]
        tensors = _shard_tensors(target.model, rows, layers, k, batch_size or cfg.train.batch_size, pad, precision,
                                 progress)
        with disk_full_said(f"teacher-cache shard {shard_name(split, index)} could not be written", folder,
                            _FREE_SPACE):
            _save_atomically(tensors, folder / shard_name(split, index))
            record_shard(manifest, folder, split, index)
            _write_json(folder / "manifest.json", manifest)
    bar.close()
    manifest.update(complete=True, bytes=sum(manifest["files"].values()))
    with disk_full_said("the teacher cache's manifest.json could not be written", folder, _FREE_SPACE):
        _write_json(folder / "manifest.json", manifest)
    return manifest


def _open_folder(folder: Path, plan: dict, overwrite: bool) -> None:
    path = folder / "manifest.json"
    if not path.is_file() or overwrite:     # a new folder: refuses one draftsmith did not write (folders.py)
        prepare_output_folder(folder, overwrite, "cache")
    if path.is_file():
        manifest = read_manifest(folder)   # a damaged or foreign manifest is refused (--overwrite replaces it)
        differ = [k for k in plan if manifest["plan"].get(k) != plan[k]]
        if differ:
            raise DraftsmithError("The output folder holds a teacher cache with another plan",
                                  f"{folder}: {', '.join(differ)} differ",
                                  "Rerun with the same recipe, overrides and --top-k to resume, pass --overwrite, "
                                  "or choose another --out")
        return
    for split in plan["splits"]:
        (folder / split).mkdir(parents=True, exist_ok=True)
    _write_json(path, {"format": FORMAT, "plan": plan, "complete": False, "versions": versions(), "files": {},
                       "sha256": {}})


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_atomically(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    finally:   # a full disk or a kill leaves no half shard behind
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def _shard_tensors(model, rows: list[dict], layers: list[int], k: int, batch_size: int, pad: int,
                   precision: str, progress) -> dict[str, torch.Tensor]:
    """One shard's tensors: the target run over `rows` in batches, as an online step runs it."""
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    hidden: dict[int, list] = {layer: [] for layer in layers}
    logits: list[tuple] = []
    tokens, trained = [0], [0]
    for s in range(0, len(rows), batch_size):
        batch = {key: v.to(device) for key, v in collate(rows[s:s + batch_size], pad).items()}
        attention = batch["attention_mask"]
        stored = batch["loss_mask"][:, 1:] & attention[:, 1:].bool()                    # [B, T-1]
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            t_logits, outputs = target_signals(model, batch["input_ids"], attention, stored, tuple(layers))
        logp = torch.log_softmax(t_logits.float(), dim=-1)                             # [N, V]
        if k < logp.shape[-1]:
            top = logp.topk(k, dim=-1)
            rest = (-torch.expm1(torch.logsumexp(top.values, dim=-1))).clamp_min(0)
            logits.append((top.values, top.indices.int(), rest))
        else:
            logits.append((logp,))
        for r, n in enumerate(attention.sum(1).tolist()):
            for layer, out in zip(layers, outputs):
                hidden[layer].append(out[r, :n].cpu())
            tokens.append(tokens[-1] + n)
            trained.append(trained[-1] + int(stored[r].sum()))
        progress(len(batch["input_ids"]), int(attention.sum()))
    names = ("logp",) if len(logits[0]) == 1 else ("topk_logp", "topk_ids", "rest")
    tensors = {name: torch.cat([part[i] for part in logits]).cpu() for i, name in enumerate(names)}
    tensors.update({f"hidden.{layer}": torch.cat(hidden[layer]) for layer in layers})
    tensors.update(token_offsets=torch.tensor(tokens, dtype=torch.int64),
                   trained_offsets=torch.tensor(trained, dtype=torch.int64))
    return tensors
