"""The built-in speculative decoder: one target forward per step verifies a chain or a tree of drafts.

It never branches on drafter kind. A drafter is a `Proposer` (protocol/proposer.py): it sees the
decode state (all tokens so far, and the target's hidden states for newly committed positions) and
proposes a draft (protocol/drafting.py: a chain, or a tree of nodes with parents). Steps, after gpt-fast's
`speculative_decode` and SpecInfer/EAGLE-2's tree verification:

  0. prefill: the target reads the prompt and emits the first token (not a verify step);
  1. draft: the proposer drafts up to depth k (with `--k auto`, the draft-length rule of
     eval/draft_length.py stops it when another node does not pay for itself, and keeps the
     best-first prefix of nodes that maximises expected tokens per second);
  2. verify: ONE target forward over [last token, draft nodes] (a tree attention mask when the draft
     branches) gives p at every node;
  3. accept: greedy match or recursive rejection sampling (protocol/tree.py) accepts a path of n nodes
     and yields one more token (correction or bonus);
  4. keep: the target cache keeps the last token and the accepted path (gathered, not recomputed);
     the proposer is shown the target's hidden states for exactly those positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.eval.verify import verify_tree_greedy, verify_tree_sampling
from draftsmith.models.target import Target
from draftsmith.protocol.drafting import Draft, DraftSampler, TreeShape
from draftsmith.protocol.proposer import DecodeState, Proposer, Sampler, takes_tree
from draftsmith.protocol.sampling import Sampling, warp
from draftsmith.protocol.tree import is_chain


class NoDraft:
    """Proposes nothing: the decoder then runs plain autoregressive decoding, one token a step."""

    hidden_layers: tuple[int, ...] = ()

    def reset(self) -> None:
        pass

    def observe(self, state: DecodeState) -> None:
        pass

    def propose(self, state: DecodeState, k: int, sampler: Sampler, tree=None) -> Draft:
        return Draft([])


@dataclass
class GenerationResult:
    tokens: list[int]                                    # new tokens only
    proposed: list[int] = field(default_factory=list)    # draft nodes verified, per verify step
    accepted: list[int] = field(default_factory=list)    # draft tokens accepted, per verify step
    emitted: list[int] = field(default_factory=list)     # tokens emitted, per verify step
    depth: list[int] = field(default_factory=list)       # longest drafted path, per verify step
    # (depth, predicted, accepted) of every verified node whose parent was accepted, when the drafter
    # predicts its own acceptance (Draft.accept): the report's reliability table
    predicted: list[tuple[int, float, bool]] = field(default_factory=list)
    draft_s: float = 0.0                                 # seconds in propose()
    verify_s: float = 0.0                                # seconds in the target's verify forwards
    # draft nodes left unverified because the target could not place their rows where they sum as plain
    # decoding's (Target.placeable: the compiled CPU target's static cache); 0 elsewhere
    unplaced: int = 0
    observe_s: float = 0.0                               # seconds in observe() after each step
    prefill_s: float = 0.0                               # seconds reading the prompt (first token, first observe)
    stop_reason: str = "max_new_tokens"

    @property
    def steps(self) -> int:
        return len(self.emitted)

    @property
    def tau(self) -> float:
        """Tokens emitted per verify step (the prefill's first token excluded)."""
        return sum(self.emitted) / self.steps if self.steps else float("nan")


def make_sampler(sampling: Sampling, generator: torch.Generator | None, rule=None) -> DraftSampler:
    return DraftSampler(sampling, generator, rule)


@dataclass
class StepDraft:
    """One row's draft for a verify step, clipped to its depth and cut by the draft-length rule."""

    tokens: list[int]
    parents: list[int]
    q: torch.Tensor | None
    conf: list | None
    accept: list | None
    drafted: int              # nodes the proposer drafted (before the rule's cut)
    draft_s: float

    @property
    def chain(self) -> bool:
        return is_chain(self.parents)

    def cut(self, n: int) -> None:
        """Keep the first n nodes: a best-first prefix, so every kept node's parent is kept."""
        self.tokens, self.parents = self.tokens[:n], self.parents[:n]
        self.q = None if self.q is None else self.q[:n]
        self.conf = None if self.conf is None else self.conf[:n]
        self.accept = None if self.accept is None else self.accept[:n]

    def keep(self, nodes: list[int]) -> None:
        """Keep these nodes (ascending, each with its parent), renumbered in order (Target.placeable)."""
        index = {old: new for new, old in enumerate(nodes)}
        self.tokens = [self.tokens[i] for i in nodes]
        self.parents = [-1 if self.parents[i] < 0 else index[self.parents[i]] for i in nodes]
        self.q = None if self.q is None else self.q[nodes]
        self.conf = None if self.conf is None else [self.conf[i] for i in nodes]
        self.accept = None if self.accept is None else [self.accept[i] for i in nodes]


def check_request(target: Target, proposer: Proposer, prompt_ids: list[int], k: int, max_new_tokens: int,
                  tree: TreeShape | None) -> None:
    if k < 0:
        raise DraftsmithError("k (draft length) must be >= 0", k)
    if max_new_tokens < 1:
        raise DraftsmithError("max_new_tokens must be >= 1", max_new_tokens)
    if not prompt_ids:
        raise DraftsmithError("The prompt is empty", prompt_ids)
    if len(prompt_ids) >= target.max_length:
        raise DraftsmithError(f"The prompt is longer than the target's context of {target.max_length} tokens",
                              len(prompt_ids), "Shorten the prompt or pick a target with a longer context")
    if tree is not None and k > 0 and not takes_tree(proposer):
        raise DraftsmithError("This drafter drafts chains only", type(proposer).__name__, "Use --tree none")


def prefill(target: Target, proposer: Proposer, prompt_ids: list[int], cache, sampler: DraftSampler,
            eos: set[int]) -> tuple[DecodeState, GenerationResult]:
    """0. The target reads the prompt alone and emits the first token; the proposer is reset and shown it. Only the
    last position's logits are computed (a drafter reads the prompt's hidden states, never its logits): the same
    target call as plain decoding's prefill, with the taps kept."""
    started = time.perf_counter()
    layers = tuple(proposer.hidden_layers)
    out = target.forward(prompt_ids, cache, layers, last_only=True)
    first, _ = sampler(out.logits[-1])
    result = GenerationResult(tokens=[first])
    state = DecodeState(tokens=list(prompt_ids) + [first], committed=len(prompt_ids),
                        hidden=out.hidden, hidden_start=0)
    proposer.reset()
    proposer.observe(state)
    result.prefill_s = time.perf_counter() - started
    if first in eos:
        result.stop_reason = "eos"
    return state, result


def draft_step(target: Target, proposer: Proposer, state: DecodeState, result: GenerationResult, k: int,
               max_new_tokens: int, sampler: DraftSampler, rule, tree: TreeShape | None) -> StepDraft | None:
    """1. Draft up to depth k (the rule's choice with --k auto); None when the context is full."""
    k_step = draft_depth(target, state, result, k, max_new_tokens, rule)
    if k_step is None:
        return None
    started = time.perf_counter()
    tree_kw = {"tree": tree} if tree is not None else {}
    draft = proposer.propose(state, k_step, sampler, **tree_kw) if k_step > 0 else Draft([])
    return take_draft(draft, k_step, time.perf_counter() - started, result, rule)


def draft_depth(target: Target, state: DecodeState, result: GenerationResult, k: int, max_new_tokens: int,
                rule) -> int | None:
    """The depth a step may draft: k, bounded by the tokens still wanted and the context (the rule's choice
    with --k auto); None when the context is full."""
    room = target.max_length - state.committed - 1      # positions left after the last token
    if room < 0:
        result.stop_reason = "context"
        return None
    k_step = min(k, max_new_tokens - len(result.tokens) - 1, room)
    return rule.depth(k_step) if rule is not None else k_step


def take_draft(draft: Draft, k_step: int, drafted_s: float, result: GenerationResult, rule) -> StepDraft:
    """The step's draft clipped to depth k_step and cut by the rule (--k auto); its seconds recorded."""
    step = StepDraft(*_clip(draft, k_step), len(draft.tokens), drafted_s)
    if rule is not None and step.tokens:
        step.cut(rule.choose(step.conf, step.parents, drafted_s, step.accept))
    result.draft_s += drafted_s
    return step


def settle(step: StepDraft, logits: torch.Tensor, result: GenerationResult, sampling: Sampling,
           generator: torch.Generator | None, eos: set[int], max_new_tokens: int) -> tuple[list[int], list[int]]:
    """3. Accept a path of the verified draft (logits [1 + nodes, V]) and record the step in `result`:
    returns (accepted nodes, tokens emitted)."""
    if sampling.greedy:
        path, nxt = verify_tree_greedy(step.tokens, step.parents, logits)
    else:
        path, nxt = verify_tree_sampling(step.tokens, step.parents, step.q, warp(logits, sampling), generator)
    new = [step.tokens[i] for i in path] + [nxt]
    for i, t in enumerate(new):              # EOS in the middle of a step ends the sequence there
        if t in eos:
            new = new[: i + 1]
            result.stop_reason = "eos"
            break
    new = new[: max_new_tokens - len(result.tokens)]
    result.tokens += new
    result.proposed.append(len(step.tokens))
    result.accepted.append(len(path))
    result.emitted.append(len(new))
    result.depth.append(_depth(step.parents))
    if step.accept is not None:
        result.predicted += _reached(step.parents, step.accept, path)
    return path, new


def advance(state: DecodeState, new: list[int], path: list[int], hidden: list[torch.Tensor]) -> tuple[DecodeState, list[int]]:
    """4. The state after a step: the target keeps the root and the accepted path (rows of the verify
    input); the proposer is shown the target's hidden states there."""
    rows = [0] + [i + 1 for i in path]
    return DecodeState(tokens=state.tokens + new, committed=state.committed + len(rows),
                       hidden=[h[rows] for h in hidden], hidden_start=state.committed), rows


@torch.inference_mode()
def speculative_generate(target: Target, proposer: Proposer, prompt_ids: list[int], *, k: int = 4,
                         max_new_tokens: int = 128, sampling: Sampling = Sampling(),
                         eos_token_ids: tuple[int, ...] = (), generator: torch.Generator | None = None,
                         tree: TreeShape | None = None, rule=None) -> GenerationResult:
    """Generate from `target` with drafts from `proposer`; the output law is the target's.

    k: the deepest draft path; tree: a TreeShape (None: a chain); rule: a DraftLengthRule for
    `--k auto` (None: every step drafts k, or the whole tree)."""
    check_request(target, proposer, prompt_ids, k, max_new_tokens, tree)
    layers = tuple(proposer.hidden_layers)
    sampler = make_sampler(sampling, generator, rule)
    eos = set(eos_token_ids)
    cache = target.new_cache()
    state, result = prefill(target, proposer, prompt_ids, cache, sampler, eos)
    while result.stop_reason != "eos" and len(result.tokens) < max_new_tokens:
        step = draft_step(target, proposer, state, result, k, max_new_tokens, sampler, rule, tree)
        if step is None:
            break
        if not step.chain:
            placed = target.placeable(step.parents, cache)
            if len(placed) < len(step.parents):
                result.unplaced += len(step.parents) - len(placed)
                step.keep(placed)          # verified exactly, where the whole tree would not be
        # 2. verify: one forward over the last token and the draft nodes
        verify_start = time.perf_counter()
        out = target.forward([state.tokens[-1]] + step.tokens, cache, layers,
                             parents=None if step.chain else step.parents)
        path, new = settle(step, out.logits, result, sampling, generator, eos, max_new_tokens)
        verify_s = time.perf_counter() - verify_start
        result.verify_s += verify_s
        if rule is not None:
            rule.update(step.conf, step.parents, path, step.drafted, step.draft_s, step.draft_s + verify_s, len(new))
        if result.stop_reason == "eos":
            break
        state, rows = advance(state, new, path, out.hidden)
        target.keep(cache, state.hidden_start, rows)
        observe_start = time.perf_counter()
        proposer.observe(state)
        result.observe_s += time.perf_counter() - observe_start
    return result


def _reached(parents: list[int], accept: list[float], path: list[int]) -> list[tuple[int, float, bool]]:
    """(depth, predicted, accepted) of the nodes whose parent is the root or on the accepted path, and that
    carry a prediction (a tree's lower-ranked siblings carry none)."""
    on_path, out, depth = set(path), [], []
    for i, parent in enumerate(parents):
        depth.append(1 if parent < 0 else depth[parent] + 1)
        if (parent < 0 or parent in on_path) and accept[i] is not None:
            out.append((depth[i], accept[i], i in on_path))
    return out


def _clip(draft: Draft, k: int):
    """The draft's nodes of depth <= k, as (tokens, parents, q, conf, accept); a chain gets chain parents."""
    n = len(draft.tokens)
    parents = list(draft.parents) if draft.parents is not None else list(range(-1, n - 1))
    keep, depth = [], []
    for i, parent in enumerate(parents[:n]):
        depth.append(1 if parent < 0 else depth[parent] + 1)
        if depth[-1] <= k and (parent < 0 or parent in keep):
            keep.append(i)
    if len(keep) < n:
        index = {old: new for new, old in enumerate(keep)}
        tokens = [draft.tokens[i] for i in keep]
        parents = [index[parents[i]] if parents[i] >= 0 else -1 for i in keep]
        q = None if draft.q is None else draft.q[keep]
        conf = None if draft.conf is None else [draft.conf[i] for i in keep]
        accept = None if draft.accept is None else [draft.accept[i] for i in keep]
        return tokens, parents, q, conf, accept
    return (list(draft.tokens), parents[:n], draft.q, None if draft.conf is None else list(draft.conf),
            None if draft.accept is None else list(draft.accept))


def _depth(parents: list[int]) -> int:
    depth: list[int] = []
    for parent in parents:
        depth.append(1 if parent < 0 else depth[parent] + 1)
    return max(depth, default=0)


def autoregressive_generate(target: Target, prompt_ids: list[int], **kwargs) -> GenerationResult:
    """Plain decoding: the same loop with no drafts, one target forward per token."""
    return speculative_generate(target, NoDraft(), prompt_ids, k=0, **kwargs)
