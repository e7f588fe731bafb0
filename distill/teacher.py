"""Teacher signals in training: online (the target runs inside every step, train/steps.py) or read
from an offline cache written by `draftsmith data cache` (train/teacher_cache.py), selected by
the recipe's `data.teacher: online | cache:DIR`.

With a cache the trainer never runs the target's decoder layers: the target loads on the CPU, the
drafter is built from it (initialisation may copy its layers), then the layers move to the meta
device (their memory freed) and only what the drafter shares — embeddings, final norm, LM head —
goes to the training device.

What a cache holds per training row: the outputs of the decoder layers the drafter reads, at every
token, and at every position whose next token carries loss, the target's log-probabilities.

The top-k approximation. With `--top-k K` < V the cache keeps, per position, the K largest
target log-probabilities log p(x) (x in S, |S| = K) and the remaining mass r = 1 − Σ_{x∈S} p(x).
Training reads the distribution
    p̃(x) = p(x) for x ∈ S,   p̃(x) = r / (V − K) otherwise,
i.e. the mass outside the top K is spread evenly over the other V − K tokens. p̃ has the same
top K, argmax and total tail mass as p; only how the tail mass is split among tail tokens is
lost. For forward KL(p̃‖q) the loss differs from KL(p‖q) by the tail terms
Σ_{x∉S} [p̃ log p̃ − p log p] − Σ_{x∉S} (p̃ − p) log q, so its gradient pulls q's tail towards a
flat r / (V − K) instead of p's tail shape: the error is bounded by r (small when K covers the
mass: r ≈ 0.02–0.1 at K = 64 for chat answers). EAGLE-3's loss renormalises p over its draft
vocabulary and masks rows whose argmax lies outside it; its argmax mask is exact, and the drafted
tail tokens get the even share. With K ≥ V the cache stores the full log-softmax and every loss
is exact (up to float rounding: the cache's target forward batches rows differently).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from draftsmith.distill.cache_files import read_manifest, verify_cache
from draftsmith.distill.data import tokenizer_fingerprint
from draftsmith.errors import DraftsmithError
from draftsmith.models.layers import target_parts

TEACHERS = "online, cache:DIR (a folder written by `draftsmith data cache`)"


def teacher_cache_dir(teacher: str) -> Path | None:
    """The cache folder of a `data.teacher` value; None for online."""
    return Path(teacher.removeprefix("cache:")) if teacher.startswith("cache:") else None


def describe_rows(rows) -> dict:
    """sha256 over every row's token ids and loss mask, and the counts (totals, and per row: tokens and
    positions whose next token carries loss): what ties a cache to the rows a run trains on (same
    data, tokenizer, split, max_length and packing)."""
    digest = hashlib.sha256()
    lengths, trained = [], []
    for row in rows:
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        mask = np.asarray(row["loss_mask"], dtype=bool)
        digest.update(np.int64(len(ids)).tobytes() + ids.tobytes() + mask.tobytes())
        lengths.append(len(ids))
        trained.append(int(mask[1:].sum()))
    return {"rows": len(lengths), "tokens": sum(lengths), "trained": sum(trained),
            "fingerprint": digest.hexdigest()[:20], "lengths": lengths, "row_trained": trained}


def expand_topk(logp: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor, vocab: int) -> torch.Tensor:
    """log p̃ [N, V] from the top-k log-probabilities [N, k], their ids [N, k] and the remaining mass
    [N]: the tail mass spread evenly over the other V − k tokens (see the module docstring)."""
    k = logp.shape[-1]
    tail = torch.log(rest.float().clamp_min(torch.finfo(torch.float32).tiny) / max(vocab - k, 1))   # [N]
    full = tail[:, None].expand(len(logp), vocab).clone()
    return full.scatter_(1, ids.long(), logp.float())


# --------------------------------------------------------------------------------------- reading

class TeacherCache:
    """A finished cache folder: manifest.json + <split>/NNNNN.safetensors, read lazily (memory-mapped)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)   # its plan checked; the shards are checked by `check`
        plan = self.manifest["plan"]
        if not self.manifest.get("complete"):
            raise DraftsmithError("This teacher cache is not finished", str(self.folder),
                                  "Rerun the same `draftsmith data cache` command: it resumes where it stopped")
        self.layers = plan["layers"]
        self.num_layers, self.vocab = plan["arch"]["num_hidden_layers"], plan["arch"]["vocab_size"]
        self.exact = plan["exact"]
        self._starts = {s: [a for a, _ in v["shards"]] for s, v in plan["splits"].items()}

    @functools.lru_cache(maxsize=16)       # open files, not data: shards are memory-mapped
    def _shard(self, split: str, index: int):
        from safetensors import safe_open

        handle = safe_open(str(self.folder / split / f"{index:05d}.safetensors"), framework="pt")
        return handle, handle.get_tensor("token_offsets"), handle.get_tensor("trained_offsets")

    def row(self, split: str, i: int) -> tuple[dict[int, torch.Tensor], tuple]:
        """({layer: [n, H]}, logit tensors of the row's trained positions) of row i of a split."""
        index = bisect.bisect_right(self._starts[split], i) - 1
        handle, tokens, trained = self._shard(split, index)
        j = i - self._starts[split][index]
        a, b, c, d = int(tokens[j]), int(tokens[j + 1]), int(trained[j]), int(trained[j + 1])
        hidden = {layer: handle.get_slice(f"hidden.{layer}")[a:b] for layer in self.layers}
        names = ("logp",) if self.exact else ("topk_logp", "topk_ids", "rest")
        return hidden, tuple(handle.get_slice(name)[c:d] for name in names)

    def check(self, cfg, target, splits: dict) -> None:
        """Refuse a cache made for other rows or another target than this run's."""
        plan = self.manifest["plan"]
        mine = {"tokenizer": tokenizer_fingerprint(target.tokenizer), "arch": architecture(target.model)}
        for key, value in mine.items():
            if plan[key] != value:
                raise DraftsmithError(f"The teacher cache was made with another target ({key} differs)",
                                      f"{self.folder}: {plan[key]} (target {plan['target']}), this run's {value} "
                                      f"({cfg.target.name})", "Write a cache with this recipe: draftsmith data cache")
        for split, rows in splits.items():
            got = describe_rows(rows)
            theirs = plan["splits"][split]
            if (got["rows"], got["fingerprint"]) != (theirs["rows"], theirs.get("fingerprint")):
                raise DraftsmithError(f"The teacher cache holds other {split} rows than this run's data",
                                      f"{self.folder}: {theirs['rows']} rows ({theirs.get('fingerprint')}), this run's "
                                      f"{got['rows']} ({got['fingerprint']})",
                                      "Use the data settings and data.source the cache was made with (its "
                                      "manifest.json lists them), or write a cache for these")
            # the shards themselves: sizes, sha256, tensor shapes, and offsets that are these rows' own
            verify_cache(self.folder, self.manifest, split, got["lengths"], got["row_trained"])


def architecture(model) -> dict:
    c = model.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "vocab_size": model.get_output_embeddings().weight.shape[0]}


class CachedRows:
    """A split's rows, each with a handle to its cached signals that `collate` turns into tensors."""

    def __init__(self, rows, cache: TeacherCache, split: str):
        self.rows, self.cache, self.split = rows, cache, split

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.rows[i])
        row["teacher"] = (self.cache, self.split, i % len(self))
        return row

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@dataclass
class BatchSignals:
    """A batch's cached signals; `signals` answers what `target_signals` computes online."""

    hidden: dict[int, torch.Tensor]     # layer -> [B, T, H], zero on padding
    stored: torch.Tensor                # [B, T-1] bool: positions with cached log-probabilities
    logits: tuple                       # (logp [M, V]) or (topk_logp [M, k], topk_ids [M, k], rest [M])
    vocab: int
    num_layers: int

    def to(self, device) -> "BatchSignals":
        return replace(self, hidden={k: v.to(device) for k, v in self.hidden.items()}, stored=self.stored.to(device),
                       logits=tuple(t.to(device) for t in self.logits))

    def signals(self, mask: torch.Tensor, layers: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[N, V] target log-probabilities (log p̃ for a top-k cache) at the N positions of `mask`
        ([B, T-1], within the cached ones) and the [B, T, H] outputs of `layers`."""
        if bool((mask & ~self.stored).any()):
            raise DraftsmithError("A training position has no cached target signal", "mask outside the loss mask",
                                  "Write the cache again with this recipe")
        keep = mask[self.stored]
        rows = tuple(t[keep] for t in self.logits)
        t_logits = rows[0] if len(rows) == 1 else expand_topk(*rows, self.vocab)
        missing = [j for j in layers if j % self.num_layers not in self.hidden]
        if missing:
            raise DraftsmithError("The drafter reads target layers the teacher cache does not hold",
                                  f"needs {sorted(j % self.num_layers for j in layers)}, cache {sorted(self.hidden)}",
                                  "Write a cache with this recipe's drafter: draftsmith data cache <recipe>")
        return t_logits, [self.hidden[j % self.num_layers] for j in layers]


def collate_signals(refs: list[tuple], loss_mask: torch.Tensor) -> BatchSignals:
    """The cached signals of a right-padded batch; `loss_mask` [B, T] is the collated one."""
    cache = refs[0][0]
    b, t = loss_mask.shape
    per_row = [cache.row(split, i) for _, split, i in refs]
    width = {layer: x.shape[-1] for layer, x in per_row[0][0].items()}
    hidden = {layer: per_row[0][0][layer].new_zeros(b, t, h) for layer, h in width.items()}
    for r, (h, _) in enumerate(per_row):
        for layer, x in h.items():
            hidden[layer][r, : len(x)] = x
    logits = tuple(torch.cat([row[1][n] for row in per_row]) for n in range(len(per_row[0][1])))
    return BatchSignals(hidden, loss_mask[:, 1:].clone(), logits, cache.vocab, cache.num_layers)


# ------------------------------------------------------------------------------------- training

def attach_cache(folder: Path, cfg, target, train_rows, heldout_rows) -> tuple[CachedRows, CachedRows]:
    """This run's rows with the cache's signals, after checking the cache was made for exactly them."""
    cache = TeacherCache(folder)
    cache.check(cfg, target, {"train": train_rows, "heldout": heldout_rows})
    if not cache.exact:
        print(f"[draftsmith] teacher cache {folder}: top-{cache.manifest['plan']['top_k']} log-probabilities, the "
              f"rest of the mass spread evenly (an approximation of the full loss; docs/data.md)", flush=True)
    return CachedRows(train_rows, cache, "train"), CachedRows(heldout_rows, cache, "heldout")


def keep_shared_parts(target, device) -> None:
    """Free the target's decoder layers (to the meta device) and move the rest — embeddings, final
    norm, LM head, what drafters share — to `device`. Run after the drafter is built from it."""
    model = target.model
    base = getattr(model, model.base_model_prefix)
    layers = base.layers
    base.layers = torch.nn.ModuleList()
    model.to(device)
    base.layers = layers.to("meta")


def cached_feature_scale(target_model, sample: dict) -> float:
    """EAGLE's feature scale (models/eagle.py `feature_scale`) from cached hidden states: the std of
    the target's final normed hidden states over the sample's real tokens."""
    signals = sample["teacher"]
    _, (hidden,) = signals.signals(torch.zeros_like(signals.stored), (-1,))   # the last layer's output
    with torch.no_grad():
        normed = target_parts(target_model)[1](hidden.to(next(target_model.parameters()).dtype))
    return float(normed[sample["attention_mask"].bool()].float().std())
