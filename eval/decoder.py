"""The built-in speculative decoder: chain drafting, one target forward per step, lossless verify.

It never branches on drafter kind. A drafter is a `Proposer`: it sees the decode state (all
tokens so far, and the target's hidden states for newly committed positions) and proposes up to k
tokens with their draft distributions. Steps, after gpt-fast's `speculative_decode`:

  0. prefill: the target reads the prompt and emits the first token (not a verify step);
  1. draft: the proposer drafts d_1..d_k from the state;
  2. verify: ONE target forward over [last token, d_1..d_k] gives p at k+1 positions;
  3. accept: greedy match or speculative sampling (verify.py) accepts n drafts and yields one
     more token (correction or bonus);
  4. roll back: the target cache keeps the last token and d_1..d_n; the proposer is shown the
     target's hidden states for exactly those positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.eval.verify import Sampling, sample, verify_greedy, verify_sampling, warp
from draftsmith.models.target import Target


@dataclass
class DecodeState:
    """What a proposer may read. The target cache holds tokens[:committed]; tokens[-1] is the
    newest emitted token, not yet seen by the target."""

    tokens: list[int]
    committed: int
    hidden: list[torch.Tensor]   # per tapped layer, [n, H] for positions hidden_start..hidden_start+n
    hidden_start: int


@dataclass
class Draft:
    tokens: list[int]
    q: torch.Tensor | None = None   # [len(tokens), V] warped draft probabilities; None = deterministic


# sampler(logits [V]) -> (token, warped q [V] or None in greedy mode)
Sampler = Callable[[torch.Tensor], "tuple[int, torch.Tensor | None]"]


class Proposer(Protocol):
    """The drafter interface. `hidden_layers`: target layers it reads (empty for token drafters)."""

    hidden_layers: tuple[int, ...]

    def reset(self) -> None: ...

    def observe(self, state: DecodeState) -> None: ...

    def propose(self, state: DecodeState, k: int, sampler: Sampler) -> Draft: ...


class NoDraft:
    """Proposes nothing: the decoder then runs plain autoregressive decoding, one token a step."""

    hidden_layers: tuple[int, ...] = ()

    def reset(self) -> None:
        pass

    def observe(self, state: DecodeState) -> None:
        pass

    def propose(self, state: DecodeState, k: int, sampler: Sampler) -> Draft:
        return Draft([])


@dataclass
class GenerationResult:
    tokens: list[int]                                    # new tokens only
    proposed: list[int] = field(default_factory=list)    # draft tokens proposed, per verify step
    accepted: list[int] = field(default_factory=list)    # draft tokens accepted, per verify step
    emitted: list[int] = field(default_factory=list)     # tokens emitted, per verify step
    stop_reason: str = "max_new_tokens"

    @property
    def steps(self) -> int:
        return len(self.emitted)

    @property
    def tau(self) -> float:
        """Tokens emitted per verify step (the prefill's first token excluded)."""
        return sum(self.emitted) / self.steps if self.steps else float("nan")


def make_sampler(sampling: Sampling, generator: torch.Generator | None) -> Sampler:
    if sampling.greedy:
        return lambda logits: (int(logits.argmax()), None)

    def draw(logits: torch.Tensor):
        q = warp(logits, sampling)
        return sample(q, generator), q
    return draw


@torch.inference_mode()
def speculative_generate(target: Target, proposer: Proposer, prompt_ids: list[int], *, k: int = 4,
                         max_new_tokens: int = 128, sampling: Sampling = Sampling(),
                         eos_token_ids: tuple[int, ...] = (), generator: torch.Generator | None = None,
                         ) -> GenerationResult:
    """Generate from `target` with drafts from `proposer`; the output law is the target's."""
    if k < 0:
        raise DraftsmithError("k (draft length) must be >= 0", k)
    if max_new_tokens < 1:
        raise DraftsmithError("max_new_tokens must be >= 1", max_new_tokens)
    if not prompt_ids:
        raise DraftsmithError("The prompt is empty", prompt_ids)
    if len(prompt_ids) >= target.max_length:
        raise DraftsmithError(f"The prompt is longer than the target's context of {target.max_length} tokens",
                              len(prompt_ids), "Shorten the prompt or pick a target with a longer context")
    layers = tuple(proposer.hidden_layers)
    sampler = make_sampler(sampling, generator)
    eos = set(eos_token_ids)
    cache = target.new_cache()

    # 0. prefill
    out = target.forward(prompt_ids, cache, layers, last_only=not layers)
    first, _ = sampler(out.logits[-1])
    result = GenerationResult(tokens=[first])
    state = DecodeState(tokens=list(prompt_ids) + [first], committed=len(prompt_ids),
                        hidden=out.hidden, hidden_start=0)
    proposer.reset()
    proposer.observe(state)
    if first in eos:
        result.stop_reason = "eos"
        return result

    while len(result.tokens) < max_new_tokens:
        room = target.max_length - state.committed - 1      # positions left after the last token
        if room < 0:
            result.stop_reason = "context"
            break
        k_step = min(k, max_new_tokens - len(result.tokens) - 1, room)
        # 1. draft
        draft = proposer.propose(state, k_step, sampler) if k_step > 0 else Draft([])
        d = draft.tokens[:k_step]
        # 2. verify: one forward over the last token and the drafts
        out = target.forward([state.tokens[-1]] + d, cache, layers)
        # 3. accept
        if sampling.greedy:
            n, nxt = verify_greedy(d, out.logits)
        else:
            q = None if draft.q is None else draft.q[: len(d)]
            n, nxt = verify_sampling(d, q, warp(out.logits, sampling), generator)
        new = d[:n] + [nxt]
        for i, t in enumerate(new):              # EOS in the middle of a step ends the sequence there
            if t in eos:
                new = new[: i + 1]
                result.stop_reason = "eos"
                break
        new = new[: max_new_tokens - len(result.tokens)]
        result.tokens += new
        result.proposed.append(len(d))
        result.accepted.append(n)
        result.emitted.append(len(new))
        if result.stop_reason == "eos":
            break
        # 4. roll back the rejected drafts; show the proposer what the target computed for the kept ones
        kept = state.committed + 1 + n
        target.rollback(cache, kept)
        state = DecodeState(tokens=state.tokens + new, committed=kept,
                            hidden=[h[: n + 1] for h in out.hidden], hidden_start=state.committed)
        proposer.observe(state)
    return result


def autoregressive_generate(target: Target, prompt_ids: list[int], **kwargs) -> GenerationResult:
    """Plain decoding: the same loop with no drafts, one target forward per token."""
    return speculative_generate(target, NoDraft(), prompt_ids, k=0, **kwargs)
