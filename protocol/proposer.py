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
