"""Several drafters as one (`--drafter prompt-lookup+runs/x/export`): their drafts become branches of
one tree, verified in the same target forward.

Prompt lookup is free and nearly always right when it matches (code, quotes, lists); a trained
head covers the rest. Greedy: branches that agree are merged, and the nodes are ordered best first
by their calibrated chance of acceptance (the decoder's draft-length rule then keeps the prefix
that pays). Sampling: branches stay separate siblings (each node keeps the law it was drawn from,
one-hot for deterministic drafters), which recursive rejection sampling verifies exactly.
"""

from __future__ import annotations

import torch

from draftsmith.protocol.drafting import Draft, TreeShape, best_first_order, subset
from draftsmith.protocol.proposer import DecodeState, Sampler, fork, observe_all, propose_all, takes_tree


class CompositeProposer:
    def __init__(self, members: list):
        self.members = members
        self.hidden_layers = tuple(layer for m in members for layer in m.hidden_layers)
        self._slices, start = [], 0
        for m in members:
            self._slices.append(slice(start, start + len(m.hidden_layers)))
            start += len(m.hidden_layers)

    def hf_assisted_kwargs(self, k: int) -> dict | None:
        """transformers has no multi-drafter mode: its closest counterpart is the first member's."""
        for m in self.members:
            if hasattr(m, "hf_assisted_kwargs"):
                return m.hf_assisted_kwargs(k)
        return None

    def fork(self) -> "CompositeProposer":
        return CompositeProposer([fork(m) for m in self.members])

    def reset(self) -> None:
        for m in self.members:
            m.reset()

    def _state_for(self, state: DecodeState, i: int) -> DecodeState:
        return DecodeState(state.tokens, state.committed, state.hidden[self._slices[i]], state.hidden_start)

    def observe(self, state: DecodeState) -> None:
        self.observe_rows([self], [state])

    def propose(self, state: DecodeState, k: int, sampler: Sampler, tree: TreeShape | None = None) -> Draft:
        return self.propose_rows([self], [state], [k], [sampler], tree)[0]

    @classmethod
    def observe_rows(cls, proposers: list["CompositeProposer"], states: list[DecodeState]) -> None:
        """Each member observes every row at once (one forward for a member that batches)."""
        for i in range(len(proposers[0].members)):
            observe_all([p.members[i] for p in proposers], [p._state_for(s, i) for p, s in zip(proposers, states)])

    @classmethod
    def propose_rows(cls, proposers: list["CompositeProposer"], states: list[DecodeState], ks: list[int],
                     samplers: list[Sampler], tree: TreeShape | None = None) -> list[Draft]:
        """Each member drafts for every row at once, then each row's drafts merge into its tree."""
        drafts: list[list[Draft]] = [[] for _ in proposers]
        for i, member in enumerate(proposers[0].members):
            # a chain-only member inside a tree request drafts its chain
            own_tree = tree if tree is not None and takes_tree(member) else None
            out = propose_all([p.members[i] for p in proposers], [p._state_for(s, i) for p, s in zip(proposers, states)],
                              ks, samplers, own_tree)
            for row, d in zip(drafts, out):
                row.append(d)
        return [merge(row, sampler, merge_equal=getattr(sampler, "sampling", None) is None or sampler.sampling.greedy)
                for row, sampler in zip(drafts, samplers)]


def merge(drafts: list[Draft], sampler, merge_equal: bool) -> Draft:
    """One tree from several drafts, best first (ancestors before descendants)."""
    tokens, parents, conf, rows = [], [], [], []
    vocab = next((d.q.shape[-1] for d in drafts if d.q is not None), None)
    node_of: dict[tuple, int] = {}
    for d_index, d in enumerate(drafts):
        d_parents = d.parents if d.parents is not None else list(range(-1, len(d.tokens) - 1))
        mapped: list[int] = []
        for i, token in enumerate(d.tokens):
            parent = -1 if d_parents[i] < 0 else mapped[d_parents[i]]
            key = (parent, token) if merge_equal else (d_index, parent, token, i)
            c = None if d.conf is None else d.conf[i]
            if key in node_of:
                node = node_of[key]
                if conf[node] is None or (c is not None and c > conf[node]):
                    conf[node] = c
            else:
                tokens.append(token)
                parents.append(parent)
                conf.append(c)
                rows.append(None if d.q is None else d.q[i])
                node = node_of[key] = len(tokens) - 1
            mapped.append(node)
    values = []
    depth = []
    for i, parent in enumerate(parents):
        depth.append(1 if parent < 0 else depth[parent] + 1)
        values.append(sampler.value(1.0 if parent < 0 else values[parent], conf[i], depth[i]))
    order = best_first_order(parents, values, len(tokens))
    out = subset(tokens, parents, conf, order)
    if vocab is not None and not merge_equal:
        out.q = torch.stack([rows[i] if rows[i] is not None else _one_hot(tokens[i], vocab) for i in order])
    return out


def _one_hot(token: int, vocab: int) -> torch.Tensor:
    q = torch.zeros(vocab)
    q[token] = 1.0
    return q
