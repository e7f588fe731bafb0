"""What the decoder hands a proposer, and the one tree builder every neural proposer uses.

`DraftSampler` turns draft logits into a token (greedy argmax, or a draw from the warped law q) and
carries the decoder's draft-length rule: `value` (a node's calibrated chance to be accepted with
its ancestors) and `worth` (whether one more node pays for itself). With a fixed k both are
neutral: the value is the cumulative draft probability and every node is worth it.

`grow_draft` builds a chain, a static tree (Medusa-style choice list) or an EAGLE-2 dynamic tree
from one primitive of the proposer, `expand(nodes, tokens, parents) -> logits [len(nodes), V]`:
the drafter reads the given nodes (each after its own ancestors) and returns the draft logits that
follow each. Proposers differ only in that primitive; the shapes of drafts live here. `grow_rows` builds
the drafts of several sequences in lockstep, one `expand_rows` call (one drafter forward) per round, and a tree
ranks the children of every row's nodes with one softmax and one topk per round (`rank`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.protocol.sampling import Sampling, sample, warp


@dataclass
class Draft:
    """A draft: a chain (parents None) or a tree whose nodes come parents first, best first.

    `q[i]` is the law node i's token was drawn from, independently of its siblings (None: every
    node is deterministic, e.g. an argmax, a top-k child or a lookup). `conf[i]` is the drafter's
    probability of node i's token given its parent (None: the drafter has no such number). `accept[i]` is
    the drafter's own prediction that node i is accepted once its parent is (a confidence head, DSpark);
    the draft-length rule then uses it instead of calibrating `conf` online (None: no such head). In a
    tree the head predicts the most likely child of each node only (the one a chain would draft): a
    lower-ranked sibling's entry is None, and the rule calibrates its `conf` as for any drafter."""

    tokens: list[int]
    q: torch.Tensor | None = None
    parents: list[int] | None = None
    conf: list[float] | None = None
    accept: list[float | None] | None = None


MAX_TREE_NODES = 1024
"""The most draft nodes a tree may verify: ONE target forward reads them all (EAGLE-2 verifies 48-60
nodes, Medusa 64); past a thousand that forward costs what a prefill does. The target's context
bounds it further (eval/harness.py, `check_draft_fits`)."""
MAX_DRAFTED_NODES = 16384
"""The most nodes a dynamic tree may draft in a step: topk + (depth - 1) * topk^2 (each level
expands the topk best frontier nodes into topk children each, with one [topk, vocab] draft-logit
block per level). dynamic:6,8,48 drafts 328; the cap keeps a mistyped tree from allocating gigabytes."""


@dataclass(frozen=True)
class TreeShape:
    """`dynamic`: EAGLE-2 (expand the `topk` best frontier nodes by cumulative value, `topk`
    children each, `depth` levels, keep the best `nodes`); `static`: a fixed list of rank paths."""

    kind: str
    depth: int
    topk: int = 1
    nodes: int = 0
    paths: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> "TreeShape | None":
        """`none`, `dynamic[:depth,topk,nodes]` or `static:FILE` (JSON list of rank paths)."""
        if spec in (None, "", "none", "chain"):
            return None
        kind, _, rest = spec.partition(":")
        if kind == "dynamic":
            try:
                values = [int(x) for x in rest.split(",")] if rest else []
            except ValueError:
                values = None
            if values is None or len(values) > 3 or any(v < 1 for v in values):
                raise DraftsmithError("--tree dynamic takes up to three positive integers: depth,topk,nodes",
                                      spec, "e.g. --tree dynamic:6,8,48")
            depth, topk, nodes = values + [6, 8, 48][len(values):]
            drafted = topk + (depth - 1) * topk * topk
            if nodes > MAX_TREE_NODES or drafted > MAX_DRAFTED_NODES:
                raise DraftsmithError(
                    f"--tree dynamic verifies at most {MAX_TREE_NODES} nodes and drafts at most {MAX_DRAFTED_NODES} "
                    "a step (topk + (depth - 1) x topk^2)", f"{spec}: {nodes} verified, {drafted} drafted",
                    "Use a smaller tree, e.g. --tree dynamic:6,8,48 (EAGLE-2's size)")
            return cls("dynamic", depth, topk, nodes)
        if kind == "static":
            return cls.static_from_file(rest)
        raise DraftsmithError("Unknown tree spec", spec, "Use none, dynamic[:depth,topk,nodes] or static:FILE")

    @classmethod
    def static_from_file(cls, path: str) -> "TreeShape":
        example = "Give a JSON list of rank paths, e.g. [[0], [1], [0, 0]]"
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise DraftsmithError("Cannot read the static tree file", path, f"{example} ({e})") from None
        if not isinstance(raw, list) or not raw:
            raise DraftsmithError(f"The static tree file {path} holds no list of rank paths", json.dumps(raw)[:80],
                                  example)
        for p in raw:   # a rank is an int: 0.9 or true must not pass as 0 or 1
            if not isinstance(p, list) or not p or not all(type(r) is int and r >= 0 for r in p):
                raise DraftsmithError(f"A path in the static tree file {path} is not a non-empty list of "
                                      "non-negative integer ranks", json.dumps(p)[:80], example)
        paths = sorted({tuple(p) for p in raw}, key=lambda p: (len(p), p))
        known = set(paths)
        bad = [p for p in paths if len(p) > 1 and p[:-1] not in known]
        if bad:
            raise DraftsmithError("A static tree path lacks its parent path", list(bad[0]),
                                  "List every prefix of every path, e.g. [[0], [0, 1]] not [[0, 1]]")
        if len(paths) > MAX_TREE_NODES:
            raise DraftsmithError(f"A static tree verifies at most {MAX_TREE_NODES} nodes in one target forward",
                                  f"{path}: {len(paths)} paths", "Use a smaller tree")
        return cls("static", max(len(p) for p in paths), max(max(p) for p in paths) + 1, len(paths), tuple(paths))


class DraftSampler:
    """Callable `sampler(logits [V]) -> (token, warped q [V] or None in greedy mode)` + the rule."""

    def __init__(self, sampling: Sampling, generator: torch.Generator | None = None, rule=None):
        self.sampling = sampling
        self.generator = generator
        self.rule = rule

    def __call__(self, logits: torch.Tensor):
        if self.sampling.greedy:
            return int(logits.argmax()), None
        q = warp(logits, self.sampling)
        return sample(q, self.generator), q

    def law(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft law whose probabilities are the nodes' confidences (softmax in greedy mode)."""
        if self.sampling.greedy:
            return logits.float().softmax(-1)
        return warp(logits, self.sampling)

    def value(self, parent_value: float, conf: float | None, depth: int, accept: float | None = None) -> float:
        if self.rule is None:
            return parent_value * (1.0 if conf is None else conf)   # neutral: EAGLE-2's cumulative draft probability
        return self.rule.value(parent_value, conf, depth, accept)

    def worth(self, value: float, nodes: int) -> bool:
        return True if self.rule is None else self.rule.worth(value, nodes)


Expand = Callable[[list[int], list[int], list[int]], torch.Tensor]
Request = tuple[list[int], list[int], list[int]]          # expand's arguments: (nodes, tokens, parents)
ExpandRows = Callable[[dict[int, Request]], dict[int, torch.Tensor]]
Accept = Callable[["int | None", int], float]
"""accept(previous token or None for the root's children, depth from 1) -> predicted acceptance of a node
there: a confidence head reads the token before the node, not the node's own."""


def grow_draft(expand: Expand, root_logits: torch.Tensor, k: int, sampler: DraftSampler,
               tree: TreeShape | None = None, accept: Accept | None = None) -> Draft:
    """A draft of depth <= k from the logits after the root and the proposer's `expand`; `accept`: the
    drafter's predicted acceptance per node (Draft.accept), None without a confidence head."""
    width = _width(tree)
    steps = grow_steps(rank([sampler], [root_logits[None]], width)[0] if k >= 1 else None, k, sampler, tree, accept)
    try:
        request = next(steps)
        while True:
            request = steps.send(rank([sampler], [expand(*request)], width)[0])
    except StopIteration as done:
        return done.value


def grow_rows(expand_rows: ExpandRows, roots: list[torch.Tensor], ks: list[int], samplers: list[DraftSampler],
              tree: TreeShape | None = None, accepts: list[Accept | None] | None = None) -> list[Draft]:
    """grow_draft for several sequences in lockstep (batched decoding): each round, ONE call
    `expand_rows({row: (nodes, tokens, parents)})` answers every row still drafting with its logits, so a
    drafter can read all their nodes in one forward, and a tree ranks every row's answers at once (`rank`).
    Row r's draft is the one grow_draft would build from the same logits."""
    accepts = accepts or [None] * len(roots)
    width = _width(tree)
    drafting = [r for r in range(len(roots)) if ks[r] >= 1]
    ranked = dict(zip(drafting, rank([samplers[r] for r in drafting], [roots[r][None] for r in drafting], width)))
    steps = [grow_steps(ranked.get(r), ks[r], samplers[r], tree, accepts[r]) for r in range(len(roots))]
    drafts: list[Draft | None] = [None] * len(roots)
    requests: dict[int, Request] = {}

    def advance(r: int, answer: Ranked | None) -> None:
        try:
            requests[r] = next(steps[r]) if answer is None else steps[r].send(answer)
        except StopIteration as done:
            drafts[r] = done.value

    for r in range(len(roots)):
        advance(r, None)
    while requests:
        answers = expand_rows(dict(requests))
        order = list(requests)
        requests.clear()
        for r, answer in zip(order, rank([samplers[r] for r in order], [answers[r] for r in order], width)):
            advance(r, answer)
    return drafts


@dataclass
class Ranked:
    """The draft logits after some nodes ([n, V]: an expand answer, or the root's [1, V]) and each node's `width`
    most likely tokens under the draft law, best first: chains read `logits`, trees `top(j)`."""

    logits: torch.Tensor
    ids: list[list[int]]
    probs: list[list[float]]

    def top(self, j: int) -> list[tuple[int, float]]:
        """Node j's most likely children (token, probability), those of probability 0 left out."""
        return [(t, p) for t, p in zip(self.ids[j], self.probs[j]) if p > 0]


def rank(samplers: list[DraftSampler], blocks: list[torch.Tensor], width: int) -> list[Ranked]:
    """Rank the tokens of each block of draft logits: ONE law and ONE topk over every block at once where the
    samplers share a law (a batched round's rows do: one Sampling, one sampler class), else block by block; width 0
    (a chain, which samples from the logits itself) ranks nothing. A block's ranks are those it gets alone: softmax
    and topk work row by row."""
    if width < 1 or not blocks:
        return [Ranked(b, [[] for _ in range(len(b))], [[] for _ in range(len(b))]) for b in blocks]
    if any(s.sampling != samplers[0].sampling or type(s) is not type(samplers[0]) for s in samplers[1:]):
        return [rank([s], [b], width)[0] for s, b in zip(samplers, blocks)]
    law = samplers[0].law(blocks[0] if len(blocks) == 1 else torch.cat(blocks))
    probs, ids = law.topk(min(width, law.shape[-1]))
    probs, ids = probs.tolist(), ids.tolist()
    out, start = [], 0
    for b in blocks:
        out.append(Ranked(b, ids[start:start + len(b)], probs[start:start + len(b)]))
        start += len(b)
    return out


def _width(tree: TreeShape | None) -> int:
    """How many children of a node a tree may keep (a chain samples its one child from the logits: 0)."""
    return 0 if tree is None else tree.topk


def grow_steps(root: Ranked | None, k: int, sampler: DraftSampler, tree: TreeShape | None = None,
               accept: Accept | None = None) -> Generator[Request, Ranked, Draft]:
    """The tree builder as a coroutine: it yields each expand request (nodes, tokens, parents), is sent
    the logits that follow those nodes, ranked (`rank`), and returns the draft (grow_draft and grow_rows
    drive it). `root`: the logits after the root, ranked (None where k < 1: nothing is drafted)."""
    if k < 1:
        return Draft([])
    if tree is None:
        return (yield from _chain(root, k, sampler, accept))
    if tree.kind == "static":
        return (yield from _static(root, k, sampler, tree, accept))
    return (yield from _dynamic(root, k, sampler, tree, accept))


def _accept(accept: Accept | None, tokens: list[int], parent: int, depth: int) -> float | None:
    return None if accept is None else accept(None if parent < 0 else tokens[parent], depth)


def _chain(root: Ranked, k: int, sampler: DraftSampler, accept: Accept | None) -> Generator[Request, Ranked, Draft]:
    tokens, qs, conf, parents, acc = [], [], [], [], []
    logits = root.logits[0]
    value = 1.0
    for i in range(k):
        token, q = sampler(logits)
        c = float((q if q is not None else sampler.law(logits))[token])
        a = _accept(accept, tokens, i - 1, i + 1)
        value = sampler.value(value, c, i + 1, a)
        if i and not sampler.worth(value, i):
            break
        tokens.append(token)
        qs.append(q)
        conf.append(c)
        acc.append(a)
        parents.append(i - 1)
        # a child's value never exceeds its parent's: when even this node's value would not pay for
        # one more node, the next is not drafted (its draft forward would be wasted)
        if i + 1 >= k or not sampler.worth(value, i + 1):
            break
        logits = (yield [i], tokens, parents).logits[0]
    return Draft(tokens, None if qs[0] is None else torch.stack(qs), None, conf, None if accept is None else acc)


def best_first_order(parents: list[int], values: list[float], keep: int) -> list[int]:
    """The `keep` best nodes by value (ancestors always kept), parents first, best first."""
    rank = sorted(range(len(parents)), key=lambda i: -values[i])
    chosen: set[int] = set()
    for i in rank:
        if len(chosen) >= keep:
            break
        node = i
        while node >= 0 and node not in chosen:   # values fall along a path, so ancestors come first
            chosen.add(node)
            node = parents[node]
    pending = sorted(chosen, key=lambda i: (-values[i], i))
    placed: set[int] = set()
    out: list[int] = []
    while pending:        # a child whose value ties its parent's must still come after it
        i = next(i for i in pending if parents[i] < 0 or parents[i] in placed)
        out.append(i)
        placed.add(i)
        pending.remove(i)
    return out


def subset(tokens: list[int], parents: list[int], conf: list, order: list[int], accept: list | None = None) -> Draft:
    """The draft made of nodes `order` (an ancestor-closed list, parents first), renumbered."""
    index = {old: new for new, old in enumerate(order)}
    return Draft([tokens[i] for i in order], None, [index[parents[i]] if parents[i] >= 0 else -1 for i in order],
                 [conf[i] for i in order], None if accept is None else [accept[i] for i in order])


def best_first(tokens, parents, conf, values, keep: int, accept: list | None = None) -> Draft:
    return subset(tokens, parents, conf, best_first_order(parents, values, keep), accept)


def _dynamic(root: Ranked, k: int, sampler: DraftSampler, tree: TreeShape,
             accept: Accept | None = None) -> Generator[Request, Ranked, Draft]:
    """EAGLE-2 (Li et al. 2406.16858): expand the `topk` frontier nodes of highest cumulative value,
    `topk` children each, for up to `depth` levels; verify the best `nodes` of all drafted."""
    tokens, parents, conf, values, depth_of, acc = [], [], [], [], [], []

    def add(children_of: list[tuple[int, list]]) -> list[int]:
        new = []
        for parent, kids in children_of:
            base = 1.0 if parent < 0 else values[parent]
            d = 1 if parent < 0 else depth_of[parent] + 1
            a = _accept(accept, tokens, parent, d)
            for rank, (token, c) in enumerate(kids):    # the head predicts the most likely child (rank 0) only
                tokens.append(token)
                parents.append(parent)
                conf.append(c)
                acc.append(a if rank == 0 else None)
                depth_of.append(d)
                values.append(sampler.value(base, c, d, acc[-1]))
                new.append(len(tokens) - 1)
        return new

    level = add([(-1, root.top(0))])
    for _ in range(min(tree.depth, k) - 1):
        frontier = sorted(level, key=lambda i: -values[i])[: tree.topk]
        frontier = [i for i in frontier if sampler.worth(values[i], len(tokens))]
        if not frontier:
            break
        answer = yield frontier, tokens, parents
        level = add([(i, answer.top(j)) for j, i in enumerate(frontier)])
    return best_first(tokens, parents, conf, values, tree.nodes, None if accept is None else acc)


def _static(root: Ranked, k: int, sampler: DraftSampler, tree: TreeShape,
            accept: Accept | None = None) -> Generator[Request, Ranked, Draft]:
    """A fixed tree of rank paths (Medusa's `medusa_choices`): path (r1, .., rd) is the r_d-th most
    likely child of path (r1, .., r_{d-1}), the root's when d = 1."""
    tokens, parents, conf, values, acc = [], [], [], [], []
    node_of: dict[tuple[int, ...], int] = {}
    tops = {(): root.top(0)}
    for depth in range(1, min(tree.depth, k) + 1):
        paths = [p for p in tree.paths if len(p) == depth and p[:-1] in tops]
        for p in paths:
            options = tops[p[:-1]]
            if p[-1] >= len(options):
                continue
            token, c = options[p[-1]]
            parent = node_of.get(p[:-1], -1)
            tokens.append(token)
            parents.append(parent)
            conf.append(c)
            acc.append(_accept(accept, tokens[:-1], parent, depth) if p[-1] == 0 else None)   # rank 0 only
            values.append(sampler.value(1.0 if parent < 0 else values[parent], c, depth, acc[-1]))
            node_of[p] = len(tokens) - 1
        grow = [p for p in paths if p in node_of and any(len(c) == depth + 1 and c[:-1] == p for c in tree.paths)]
        if not grow or depth == min(tree.depth, k):
            break
        answer = yield [node_of[p] for p in grow], tokens, parents
        for j, p in enumerate(grow):
            tops[p] = answer.top(j)
    return best_first(tokens, parents, conf, values, len(tokens), None if accept is None else acc)
