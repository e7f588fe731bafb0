"""The target's fast path (`draftsmith eval --compile`): a static KV cache and a compiled forward.

Measured on the project CPU (bench/target_cost_curves.py): SmolLM2-135M's eager forward is bound by per-op
overhead and by its matrix kernels, not by arithmetic. torch.compile removes the overhead; the linear layers run the
kernel measured fastest on this CPU (models/cpu_linear.py): draftsmith's row kernel (models/row_kernel.py), oneDNN
with each weight packed once for it, or `mm` on the weights as they are. Either way the weights are inputs of the
graph, so inductor caches it: a later run on the same model shape compiles in a fraction of the first's time. The
forward needs a static cache (fixed addresses, so the graph never sees a growing tensor) and explicit masks (every
width one graph shape: `dynamic=True` compiles one graph for width 1 and one for all wider inputs; with oneDNN or the
row kernel no forward is narrower than 2 rows).

- `StaticKV`: transformers' StaticCache sized for the run (and spare slots for trees), plus the committed length;
  its layers write each new token at the slot `place` gives it (models/slot_layer.py). Rollback moves the length
  back; stale slots past it are never attended (every forward passes its own mask over all slots). Keeping a
  tree's accepted rows copies them into place, as the dynamic cache's `keep` does.
- `CompiledForward`: the model with its final norm applied outside the decoder, so every layer's output before
  the norm comes back (the taps drafters read, the last layer's included), compiled once for all drafters. On a CPU
  the batch-1 forward attends with models/row_attention.py: with a row-invariant linear kernel (oneDNN's, draftsmith's
  row kernel) every row of a chain verify then
  gets plain decoding's logits bit for bit, fp32 and bf16; a tree's off-chain rows, placed by `tree_slots`, too in
  fp32, up to rounding in bf16 (bench/results/cpu-exact-fp32-trees; batched rows up to rounding, models/static_rows.py).
A run falls back to eager with a warning where torch.compile is unavailable (no C++ compiler, an old torch).
"""

from __future__ import annotations

import copy
import inspect
import sys
import time
import warnings

import torch
import torch._dynamo.config
from torch._dynamo.utils import counters
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from draftsmith.errors import DraftsmithError
from draftsmith.models import cpu_linear, row_attention, slot_sums
from draftsmith.models.slot_layer import SlotLayer
from draftsmith.protocol.tree import depths, is_chain


def vector_lanes() -> int:
    """fp32 lanes of the vector type aten's CPU kernels run on this machine: 8 on AVX2, 16 on AVX-512; 16 where not
    known (a multiple of the usual 8). The attention sums a row's exps lane by lane in this width (`node_slots`)."""
    return 8 if torch.backends.cpu.get_cpu_capability() == "AVX2" else 16


LANES = vector_lanes()
"""A tree node's slot is its plain-decoding slot plus a multiple of LANES (see `tree_slots`): the narrower the lane,
the fewer moves cross a boundary of the matrix library's blocks (models/slot_sums.py), and the fewer nodes are left out
(on the AVX2 EPYC of 2026-12-07, 8 lanes instead of 16: bench/results/cpu-avx2)."""
KEY_BLOCK = 512
"""torch's CPU flash attention sums a query's keys in blocks of this many slots, merging the blocks' sums."""
SPARE_LANES = 4
"""Slots kept past max_length for trees' off-chain nodes: a depth may hold SPARE_LANES + 1 nodes at aligned slots."""


def tree_slots(parents: list[int], past: int, slots: int, apart: frozenset[int] = frozenset()) -> list[int] | None:
    """The cache slots of a tree verify's rows [root, node 0, ...] after `past` committed tokens such that each row's
    attention sums its terms as plain decoding's would, or None where a node cannot sit so (`node_slots`)."""
    placed = node_slots(parents, past, slots, apart)
    return None if None in placed else [past] + placed


def placeable(parents: list[int], past: int, slots: int, apart: frozenset[int] = frozenset()) -> list[int]:
    """The nodes of a tree that `node_slots` can place (each with its ancestors; of a node's children, a first few):
    the tree a verify computes as plain decoding would."""
    return [i for i, slot in enumerate(node_slots(parents, past, slots, apart)) if slot is not None]


def node_slots(parents: list[int], past: int, slots: int, apart: frozenset[int] = frozenset()) -> list[int | None]:
    """Each node's cache slot in a tree verify after `past` committed tokens, or None for a node that cannot sit where
    its row sums as plain decoding's (and for its descendants). The last of `slots` is kept for a padded row; `apart`:
    the slots x whose key the attention sums otherwise at x + LANES (models/slot_sums.py, measured for this cache).

    Plain decoding reads a node at depth d at slot past + d, after its ancestors at past .. past + d - 1. Packed one
    after another, a tree's second child (and its subtree) sits at other slots: its row attends the same keys, but
    the CPU attention sums a row's scores and values lane by lane (slot mod 16 on AVX-512, 8 on AVX2) and the terms
    group otherwise (measured on SmolLM2 bf16, AVX-512: 23 of 160 off-chain rows differed from plain decoding's by up
    to 0.57 on a logit; with the node 16 slots further, 0 of 160; 8 slots further, 4). So node i sits at past + depth +
    LANES * j, where j is the smallest lane index not taken at its depth and no smaller than its parent's (a
    path's slots increase, as plain decoding's do); a chain is j = 0 throughout: past, past + 1, .... A node whose
    slot would fall in another KEY_BLOCK than its plain-decoding slot, across a move `apart` marks (the matrix
    library's blocks: fp32 off-chain rows then bit for bit, bench/results/cpu-exact-fp32-trees), or past the cache,
    gets None and takes no lane: a later sibling would take a lane as far or further, and gets None too, so a node
    keeps a first few of its children. bf16 rows still round apart now and then (bench/results/cpu-exact-fp32-trees:
    oneDNN's bf16 product groups keys otherwise, not mapped)."""
    levels = depths(parents)
    lane = {-1: 0}
    taken: dict[int, set[int]] = {}
    out: list[int | None] = []
    for i, parent in enumerate(parents):
        if parent >= 0 and out[parent] is None:
            out.append(None)
            continue
        j = lane[parent]
        used = taken.setdefault(levels[i], set())
        while j in used:
            j += 1
        plain = past + levels[i]
        slot = plain + LANES * j
        if slot >= slots - 1 or slot // KEY_BLOCK != plain // KEY_BLOCK or not apart.isdisjoint(
                range(plain, slot, LANES)):
            out.append(None)
            continue
        used.add(j)
        lane[i] = j
        out.append(slot)
    return out


class StaticKV:
    """A static KV cache of `max_length` slots (and spares) and the number of them committed (module docstring)."""

    def __init__(self, model: torch.nn.Module, max_length: int):
        self.slots = self.slots_for(max_length)
        self.cache = StaticCache(config=model.config, max_cache_len=self.slots)
        self.device = next(model.parameters()).device
        self.placed_anywhere = all(type(layer) is StaticLayer for layer in self.cache.layers)
        if self.placed_anywhere:   # plain full-attention layers: each token written at the slot `place` gives it
            self.cache.layers = [SlotLayer(self.slots) for _ in self.cache.layers]
        self.apart = slot_sums.for_model(model, self.slots, LANES) if self.placed_anywhere and \
            self.device.type == "cpu" else frozenset()
        self.max_length = max_length
        self.length = 0
        self.placed: list[int] = []

    @staticmethod
    def slots_for(max_length: int) -> int:
        """max_length, one spare slot (a padded single-token forward writes a row there) and SPARE_LANES lanes of
        spares for trees (`tree_slots`), rounded up to whole lanes: the attention sums a last part-lane of keys apart
        (one scalar at a time, with another exp)."""
        return -(-(max_length + 1 + LANES * SPARE_LANES) // LANES) * LANES

    def get_seq_length(self) -> int:
        return self.length

    def layers(self) -> list:
        return self.cache.layers

    def place(self, parents: list[int], pad: int) -> list[int]:
        """Commit the next forward's rows ([root, node 0, ...] with `parents`; a chain's parents for plain decoding
        and chains) and return their slots: consecutive after the committed ones for a chain; a tree's nodes at
        `tree_slots` where they fit (else consecutive, its off-chain rows then plain decoding's up to rounding: the
        decoder verifies only the nodes that fit, Target.placeable).
        `pad` more rows (copies of the last, never committed) are written to the slot after the highest."""
        n, past = len(parents) + 1, self.length
        if past + n > self.max_length:
            raise DraftsmithError("The compiled target's static cache is full", past + n,
                                  f"It holds {self.max_length} tokens: give a larger --max-new-tokens budget "
                                  "to size it, or run without --compile")
        placed = None if is_chain(parents) or not self.placed_anywhere else tree_slots(parents, past, self.slots,
                                                                                       self.apart)
        self.placed = placed or list(range(past, past + n))
        self.length = past + n
        if self.placed_anywhere:
            write_at = torch.tensor([self.placed + [max(self.placed) + 1] * pad], device=self.device)
            for layer in self.cache.layers:
                layer.write_at = write_at
        return self.placed

    def placeable(self, parents: list[int]) -> list[int]:
        """The nodes `place` would put where each row is summed as plain decoding sums it (`placeable` above); a
        chain's all, and all where the layers place nothing (a tree then packed, its off-chain rows up to rounding)."""
        if is_chain(parents) or not self.placed_anywhere:
            return list(range(len(parents)))
        return placeable(parents, self.length, self.slots, self.apart)

    @torch.inference_mode()
    def rollback(self, length: int) -> None:
        if length > self.length:
            raise ValueError(f"cannot roll a cache of {self.length} forward to {length}")
        self.length = length
        self.sync()

    @torch.inference_mode()
    def keep(self, start: int, rows: list[int]) -> None:
        """Keep slots [:start] and, of the last forward's rows (offsets from start: 0 its root at slot start), `rows`
        in order, moved to follow the committed slots."""
        where = self.placed if self.placed[:1] == [start] else range(start, start + max(rows, default=0) + 1)
        src = [where[r] for r in rows]
        if src != list(range(start, start + len(rows))):
            src_i = torch.tensor(src)
            dst = torch.arange(start, start + len(rows))
            for layer in self.cache.layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name)
                    t[:, :, dst.to(t.device)] = t[:, :, src_i.to(t.device)]
        self.length = start + len(rows)
        self.sync()

    def sync(self) -> None:
        """transformers' StaticLayer writes the next keys at its own running length: keep it equal to ours (after a
        rollback, a keep, or a padded forward that wrote one row more than it committed)."""
        for layer in self.cache.layers:
            counter = getattr(layer, "cumulative_length", None)
            if isinstance(counter, torch.Tensor):
                counter.fill_(self.length)


class _Tapped(torch.nn.Module):
    """logits and every decoder layer's output (before the final norm) of one forward over a static cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        base = getattr(model, model.base_model_prefix)
        decoder = copy.copy(base)                # the same layers and weights, its own module table
        decoder._modules = dict(base._modules)
        decoder.norm = torch.nn.Identity()       # so its last hidden state is the last layer's output, pre-norm
        self.decoder, self.norm, self.head = decoder, base.norm, model.get_output_embeddings()
        self.cache_kwarg = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"

    def forward(self, ids, positions, mask, cache, last_only: bool, extra: dict):
        out = self.decoder(input_ids=ids, position_ids=positions, attention_mask=mask, **{self.cache_kwarg: cache},
                           use_cache=True, output_hidden_states=True, **extra)
        h = out.last_hidden_state
        logits = self.head(self.norm(h[:, -1:] if last_only else h))
        # hidden_states: the embeddings, then each layer's output; the last layer's is the decoder's last hidden
        # state (its norm is ours: transformers may put a normed state in the last slot of hidden_states)
        return logits, list(out.hidden_states[1:-1]) + [h]


MAX_COMPILED_WIDTH = 64
"""Inputs up to this many tokens (every verify step, short prompts) run compiled; longer prefills, and prefills
that want the last logits only, run the same module eagerly: one graph for width 1 and one for 2..64, instead of
one more per prompt shape."""


class CompiledForward:
    """The static-cache forward, compiled on first use (module docstring). One module and one set of graphs serve
    every drafter: a forward returns every layer's output (the decoder computes them anyway) and the caller keeps
    the taps it wants. On a CPU the linear layers run the kernel measured fastest there (models/cpu_linear.py):
    with oneDNN or draftsmith's row kernel the model's linear layers are swapped for the kernel's (in place, the
    eager forward too) and no forward is narrower than `min_width` rows."""

    def __init__(self, model: torch.nn.Module, linear_kernel: str = "auto", row_invariant: bool = True):
        cpu_linear.unpack(model)                 # compiled before: measure and choose on the plain layers
        self.kernel = cpu_linear.choose(model, linear_kernel)
        if self.kernel.name == "onednn":
            cpu_linear.lower_to_onednn()
        if self.kernel.name in cpu_linear.LAYERS:
            cpu_linear.pack(model, kernel=self.kernel.name)
        self.module = _Tapped(model)
        self.min_width = self.kernel.min_width
        on_cpu = next(model.parameters()).device.type == "cpu"
        self.row_attention = on_cpu and row_invariant and row_attention.install(model)
        if not self.row_attention:
            row_attention.uninstall(model)
        self.compiled = None
        self.fallback: str | None = None

    def __call__(self, ids, positions, mask, cache, last_only: bool, extra: dict):
        if self.fallback or last_only or ids.shape[1] > MAX_COMPILED_WIDTH:
            return self.module(ids, positions, mask, cache, last_only, extra)
        if self.compiled is None:
            self.compiled = torch.compile(self.module, dynamic=True)
        if ids.shape[1] > 1:
            _dynamic_width(ids, positions, mask, cache, extra)
        try:
            # specialize_float: a float attribute of the model (nn.Embedding's norm_type) would be traced as a
            # symbol, then specialised by a restart of the whole trace (70 of 100 s of a cached SmolLM2 compile)
            graphs, started = counters["stats"]["unique_graphs"], time.perf_counter()
            with torch._dynamo.config.patch(specialize_float=True):
                out = self.compiled(ids, positions, mask, cache, False, extra)
            if counters["stats"]["unique_graphs"] != graphs:
                width = "one token" if ids.shape[1] == 1 else "any width"
                print(f"[draftsmith] compiled the target's forward for {width} in {time.perf_counter() - started:.0f}"
                      " s (a later run on this model, dtype and torch loads the graph from inductor's cache, in a "
                      "fraction of that)", file=sys.stderr, flush=True)
            return out
        except Exception as e:   # inductor needs a C++ toolchain: say so once and run eager
            if not _is_compile_error(e):
                raise
            self.fallback = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            warnings.warn(f"draftsmith: torch.compile failed ({self.fallback}); the target runs eager")
            return self.module(ids, positions, mask, cache, False, extra)

    def describe(self) -> str:
        """What the report says of this forward."""
        if self.fallback:
            return f"eager (torch.compile failed: {self.fallback})"
        rows = "; row-invariant attention" if self.row_attention else ""
        return f"compiled (static KV cache, torch.compile; {self.kernel.describe()}{rows})"


def _dynamic_width(ids, positions, mask, cache, extra: dict) -> None:
    """Compile the width as a dynamic size from the first call: dynamo's first graph would otherwise be specialised to
    its width (plain decoding's 2), and its code computed a row otherwise than the dynamic graph of wider forwards
    (measured on a tiny target: 1e-8 in fp32), where every row must come out alike (models/row_attention.py)."""
    mark = torch._dynamo.maybe_mark_dynamic
    mark(ids, 1)
    mark(positions, positions.dim() - 1)
    for m in mask.values() if isinstance(mask, dict) else [mask]:
        mark(m, 2)
    if extra.get("cache_position") is not None:
        mark(extra["cache_position"], 0)
    write_at = getattr(cache.layers[0], "write_at", None) if getattr(cache, "layers", None) else None
    if write_at is not None:                 # models/slot_layer.py: one tensor shared by every layer
        mark(write_at, 1)


def _is_compile_error(e: Exception) -> bool:
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor")) or "inductor" in str(e).lower()
