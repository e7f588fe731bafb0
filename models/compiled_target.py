"""The target's fast path (`draftsmith eval --compile`): a static KV cache and a compiled forward.

Measured on the project CPU (bench/target_cost_curves.py): SmolLM2-135M's eager forward is bound by reading its
weights and by per-op overhead, not by arithmetic; torch.compile with inductor's `freezing` (weights folded into
the graph and prepacked once for oneDNN, which in bf16 uses AMX) removes both. The forward needs a static cache
(fixed addresses, so the graph never sees a growing tensor) and explicit masks (every width one graph shape:
`dynamic=True` compiles one graph for width 1 and one for all wider inputs).

- `StaticKV`: transformers' StaticCache sized for the run, plus the committed length. Rollback moves the length
  back; stale slots past it are never attended (every forward passes its own mask over all slots). Keeping a
  tree's accepted rows copies them into place, as the dynamic cache's `keep` does.
- `CompiledForward`: the model with its final norm applied outside the decoder, so every layer's output before
  the norm comes back (the taps drafters read, the last layer's included), compiled once for all drafters.
A run falls back to eager with a warning where torch.compile is unavailable (no C++ compiler, an old torch).
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
from transformers import StaticCache

from draftsmith.errors import DraftsmithError


class StaticKV:
    """A static KV cache of `max_length` slots and the number of them committed (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, max_length: int):
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        self.max_length = max_length
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def layers(self) -> list:
        return self.cache.layers

    def advance(self, n: int) -> None:
        if self.length + n > self.max_length:
            raise DraftsmithError("The compiled target's static cache is full", self.length + n,
                                  f"It holds {self.max_length} tokens: give a larger --max-new-tokens budget "
                                  "to size it, or run without --compile")
        self.length += n

    @torch.inference_mode()
    def rollback(self, length: int) -> None:
        if length > self.length:
            raise ValueError(f"cannot roll a cache of {self.length} forward to {length}")
        self.length = length
        self._sync()

    @torch.inference_mode()
    def keep(self, start: int, rows: list[int]) -> None:
        """Keep slots [:start] and, of those after, `rows` (offsets from start) in order."""
        if rows != list(range(len(rows))):
            src = torch.tensor([start + r for r in rows])
            dst = torch.arange(start, start + len(rows))
            for layer in self.cache.layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name)
                    t[:, :, dst.to(t.device)] = t[:, :, src.to(t.device)]
        self.length = start + len(rows)
        self._sync()

    def _sync(self) -> None:
        """transformers' StaticLayer writes the next keys at its own running length: keep it equal to ours."""
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
    the taps it wants."""

    def __init__(self, model: torch.nn.Module):
        self.module = _Tapped(model)
        self.compiled = None
        self.fallback: str | None = None

    def __call__(self, ids, positions, mask, cache, last_only: bool, extra: dict):
        if self.fallback or last_only or ids.shape[1] > MAX_COMPILED_WIDTH:
            return self.module(ids, positions, mask, cache, last_only, extra)
        if self.compiled is None:
            self.compiled = torch.compile(self.module, dynamic=True, options={"freezing": True})
        try:
            return self.compiled(ids, positions, mask, cache, False, extra)
        except Exception as e:   # inductor needs a C++ toolchain: say so once and run eager
            if not _is_compile_error(e):
                raise
            self.fallback = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            warnings.warn(f"draftsmith: torch.compile failed ({self.fallback}); the target runs eager")
            return self.module(ids, positions, mask, cache, False, extra)


def _is_compile_error(e: Exception) -> bool:
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor")) or "inductor" in str(e).lower()
