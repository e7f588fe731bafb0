"""Draft trees as pure functions: structure, the target's tree attention, and lossless verification.

A draft is a tree of n nodes in topological order (every parent before its children): node i holds
a token and `parents[i]`, the node it follows (-1: the root, i.e. the newest emitted token that the
target has not read yet). A chain is the degenerate tree `parents = [-1, 0, 1, ...]`. The target
reads [root, node 0, ..., node n-1] in ONE forward (SpecInfer, Miao et al. 2305.09781; Medusa;
EAGLE-2): row 0 is the root, row i+1 is node i; each row attends to the cached past, to the rows of
its ancestors and to itself, at position past + depth.

Verification (eval/verify.py) walks down from the root:
- greedy: follow the child whose token equals the target's argmax; the argmax where no child
  matches is the next token (a correction, or the bonus token at a leaf). The output equals the
  target's own greedy decoding.
- sampling: recursive rejection sampling over siblings (SpecInfer; Chen et al. 2302.01318 for one
  child): with p the target's law at the current node, try its children in order; child x, drawn
  from q_x independently of its siblings, is accepted with probability min(1, p(x)/q_x(x)); on a
  rejection p becomes norm(max(0, p - q_x)) and the next sibling is tried; when every child is
  rejected the next token is drawn from the current p. Each accepted or emitted token then follows
  the target's law exactly. A deterministic child (top-k, a lookup) has q_x = one-hot(x): it is
  accepted with probability p(x) and removed from p on a rejection.
"""

from __future__ import annotations

import torch


def chain_parents(n: int) -> list[int]:
    return list(range(-1, n - 1))


def depths(parents: list[int]) -> list[int]:
    """Depth of each node (the root's children have depth 1)."""
    out: list[int] = []
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i} has parent {parent}: parents must come first (topological order)")
        out.append(1 if parent < 0 else out[parent] + 1)
    return out


def children(parents: list[int]) -> list[list[int]]:
    """Children of each row: index 0 is the root, index i+1 node i; children in node order."""
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, parent in enumerate(parents):
        kids[parent + 1].append(i)
    return kids


def is_chain(parents: list[int]) -> bool:
    return parents == chain_parents(len(parents))


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[n+1, n+1] bool: row r may see row c (the root, its ancestors, itself)."""
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i + 1] = mask[parent + 1]
        mask[i + 1, i + 1] = True
    mask[0, 0] = True
    return mask


def path_to(parents: list[int], node: int) -> list[int]:
    """Nodes from the root's child down to `node`."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]
