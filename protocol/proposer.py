"""The drafter interface: what the decoder (eval/decoder.py) shows a proposer and what it asks of it.

Every drafter kind in models/ implements `Proposer` against these types alone, so a kind depends on
the protocol, never on the decoder; the decoder never branches on drafter kind.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from draftsmith.protocol.drafting import Draft


@dataclass
class DecodeState:
    """What a proposer may read. The target cache holds tokens[:committed]; tokens[-1] is the
    newest emitted token, not yet seen by the target."""

    tokens: list[int]
    committed: int
    hidden: list[torch.Tensor]   # per tapped layer, [n, H] for positions hidden_start..hidden_start+n
    hidden_start: int


# sampler(logits [V]) -> (token, warped q [V] or None in greedy mode); a DraftSampler in the decoder
Sampler = Callable[[torch.Tensor], "tuple[int, torch.Tensor | None]"]


class Proposer(Protocol):
    """The drafter interface. `hidden_layers`: target layers it reads (empty for token drafters).
    `propose` drafts up to depth k; it takes `tree=` (a TreeShape) when it can draft trees."""

    hidden_layers: tuple[int, ...]

    def reset(self) -> None: ...

    def observe(self, state: DecodeState) -> None: ...

    def propose(self, state: DecodeState, k: int, sampler: Sampler) -> Draft: ...


def held_modules(proposer) -> list[torch.nn.Module]:
    """The nn.Modules a proposer holds as attributes, and those of its `members` (a composite's drafters), once
    each; the target's modules a drafter borrows are among them (callers skip what they must)."""
    found: dict[int, torch.nn.Module] = {}
    parts = [proposer]
    while parts:
        part = parts.pop()
        parts += getattr(part, "members", [])
        for value in vars(part).values():
            if isinstance(value, torch.nn.Module):
                found.setdefault(id(value), value)
    return list(found.values())


def takes_tree(proposer) -> bool:
    try:
        return "tree" in inspect.signature(proposer.propose).parameters
    except (TypeError, ValueError):
        return False


def fork(proposer):
    """A proposer for one more sequence decoding beside this one (batched decoding keeps one per row): the
    same weights, its own decode state. The default is a shallow copy that `reset()` gives fresh state (every
    kind's reset assigns new state objects, never clears shared ones); a proposer built of others (a
    CompositeProposer) forks them itself with a `fork()` method."""
    own = getattr(proposer, "fork", None)
    if own is not None:
        return own()
    clone = copy.copy(proposer)
    clone.reset()
    return clone


def propose_all(proposers: list, states: list[DecodeState], ks: list[int], samplers: list, tree=None) -> list[Draft]:
    """Drafts for several sequences, each by its own proposer (forks of one; a row with k = 0 drafts nothing).
    A kind that can draft many sequences in one forward defines the classmethod
    `propose_rows(proposers, states, ks, samplers, tree)` beside its `propose`; otherwise each row proposes alone."""
    drafts: list[Draft] = [Draft([]) for _ in proposers]
    rows = [r for r, k in enumerate(ks) if k > 0]
    batched = _batched(proposers, "propose_rows", "propose") if len(rows) > 1 else None
    kwargs = {"tree": tree} if tree is not None else {}
    if batched is not None:
        out = batched([proposers[r] for r in rows], [states[r] for r in rows], [ks[r] for r in rows],
                      [samplers[r] for r in rows], **kwargs)
        for r, d in zip(rows, out):
            drafts[r] = d
        return drafts
    for r in rows:
        drafts[r] = proposers[r].propose(states[r], ks[r], samplers[r], **kwargs)
    return drafts


def observe_all(proposers: list, states: list[DecodeState]) -> None:
    """observe for several sequences: one `observe_rows(proposers, states)` call where the kind defines it
    beside its `observe`, else each row observes alone."""
    batched = _batched(proposers, "observe_rows", "observe") if len(proposers) > 1 else None
    if batched is not None:
        batched(proposers, states)
        return
    for p, s in zip(proposers, states):
        p.observe(s)


def _batched(proposers: list, name: str, single: str):
    """The kind's batched method, when every proposer is of one class and that method is defined by the class
    that defines the single-row one it batches (a subclass that overrides `propose` does not inherit a parent's
    `propose_rows`, which would skip its own drafting)."""
    kind = type(proposers[0])
    if any(type(p) is not kind for p in proposers):
        return None
    owner = next((c for c in kind.__mro__ if single in vars(c)), None)
    return getattr(kind, name) if owner is not None and name in vars(owner) else None
