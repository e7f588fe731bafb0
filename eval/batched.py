"""Batched speculative decoding: N sequences decode together, each accepting its own number of tokens a step.

The single-sequence decoder's steps (eval/decoder.py), for every live row at once:

  0. a joining prompt is prefilled ALONE (batch 1, exactly as the single-sequence decoder does) and its cache
     copied into a free row of the shared ragged cache (models/batch_cache.py; with --compile the static rows of
     models/static_rows.py, verified through the compiled graph); a row that finishes frees its
     row for the next waiting prompt (continuous batching), so the batch stays full while prompts wait;
  1. draft: each row has its own proposer (`protocol.proposer.fork`: the same weights, its own decode state) and
     sampler; `propose_all` drafts for every row at once: a kind that defines `propose_rows` (the EAGLE heads,
     and a composite of members that do) runs each drafting round as ONE drafter forward over all rows
     (models/row_batch.py pads their caches), the others draft row by row; the decoder never branches on kind;
  2. verify: ONE target forward over every row's [last token, draft nodes], padded to the widest row;
  3. accept: per row, greedy match or recursive rejection sampling, each row with its own generator (seeded
     as the single-sequence run of that prompt is), so the sampling law holds per row;
  4. keep: each row keeps its root and accepted path (compacted in place); the proposers observe their rows
     at the start of the next step that drafts (`observe_all`: one head forward for every row where the kind
     defines `observe_rows`), over every position kept since they last looked (`unseen_since`).

Kinds with a batched form: eagle, eagle3 (propose and observe), P-EAGLE (propose: one forward drafts every
row's block), dflash / dspark (propose: one forward for every row's block; observe: one context projection),
PARD and small LMs (models/lm_rows.py: one forward per drafting round over every row).

`--k auto` with a batch: the rule's cost curve is the target's forward over `rows` rows of n tokens each,
divided by the rows (each row's share of a step), measured at the batch size asked; each row's draft length
is chosen against that share, then the step's width (every row pays for the widest row's, in padding) is the
one that maximises the whole batch's expected tokens per second (`common_width`), and longer drafts are cut.
And whether a step drafts at all is measured (`DraftGate`, eval/draft_length.py): at a batch where drafting (its
forwards and observes for every row, and the wider verify) measurably loses to steps without drafts, steps run
without drafts, and every 8th drafts to measure it again; such a step never calls the proposers.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from draftsmith.eval.decoder import (GenerationResult, StepDraft, advance, check_request, draft_depth, make_sampler,
                                     prefill, settle, take_draft)
from draftsmith.eval.draft_length import DraftGate
from draftsmith.models.target import Target
from draftsmith.protocol.drafting import DraftSampler, TreeShape
from draftsmith.protocol.proposer import DecodeState, Proposer, fork, observe_all, propose_all
from draftsmith.protocol.sampling import Sampling


@dataclass
class BatchTiming:
    """Where a batched run's time went (seconds, whole batch), and how full its steps were."""

    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0      # the batched target forwards and acceptance
    keep_s: float = 0.0        # compacting the ragged cache
    observe_s: float = 0.0
    steps: int = 0             # batched verify steps
    undrafted_steps: int = 0   # of them, steps --k auto ran without drafting (DraftGate)
    rows: list[int] = field(default_factory=list)    # live rows per step
    width: list[int] = field(default_factory=list)   # verify width (root + widest draft) per step

    def as_dict(self, total_s: float) -> dict:
        parts = {"prefill_s": self.prefill_s, "draft_s": self.draft_s, "verify_s": self.verify_s,
                 "keep_s": self.keep_s, "observe_s": self.observe_s}
        per_step = {k.replace("_s", "_ms_per_step"): (v * 1e3 / self.steps if self.steps else None)
                    for k, v in parts.items() if k != "prefill_s"}
        return {**parts, "other_s": total_s - sum(parts.values()), "steps": self.steps,
                "undrafted_steps": self.undrafted_steps, **per_step,
                "mean_rows_per_step": sum(self.rows) / self.steps if self.steps else None,
                "mean_verify_width": sum(self.width) / self.steps if self.steps else None}


@dataclass
class _Row:
    index: int                  # the prompt's index
    proposer: Proposer
    sampler: DraftSampler       # its generator is the row's (sampling)
    state: DecodeState
    result: GenerationResult
    step: StepDraft | None = None
    unseen: bool = False        # the proposer has not observed `state` (a step without drafts, or the last step)


@torch.inference_mode()
def batched_generate(target: Target, proposer: Proposer, prompts: list[list[int]], *, batch_size: int, k: int = 4,
                     max_new_tokens: int = 128, sampling: Sampling = Sampling(), eos_token_ids: tuple[int, ...] = (),
                     generators: list[torch.Generator | None] | None = None, tree: TreeShape | None = None,
                     rule=None, timing: BatchTiming | None = None, draft_gate: bool = True) -> list[GenerationResult]:
    """Generate for every prompt, `batch_size` rows at a time (continuous batching); results in prompt order.
    generators[i] is prompt i's (sampling), as the single-sequence run of that prompt would get it. With a rule
    (--k auto), `draft_gate` lets DraftGate run steps without drafts (False: every step drafts; bench/draft_gate.py)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    for prompt in prompts:
        check_request(target, proposer, prompt, k, max_new_tokens, tree)
    timing = timing if timing is not None else BatchTiming()
    generators = generators or [None] * len(prompts)
    layers = tuple(proposer.hidden_layers)
    eos = set(eos_token_ids)
    results: list[GenerationResult | None] = [None] * len(prompts)
    waiting = deque(range(len(prompts)))
    rows: list[_Row | None] = []
    cache = target.new_batch_cache()
    gate = DraftGate() if rule is not None and draft_gate else None
    while True:
        _join(target, proposer, prompts, waiting, rows, cache, results, batch_size, generators, sampling, rule, eos,
              max_new_tokens, timing)
        live = [r for r in rows if r is not None]
        if not live:
            break
        step_started = time.perf_counter()
        drafting, observed_s = gate is None or gate.drafts(), 0.0
        if drafting:          # the proposers read what the target kept since they last looked (step 4, deferred)
            behind = [row for row in live if row.unseen]
            started = time.perf_counter()
            observe_all([row.proposer for row in behind], [row.state for row in behind])
            observed_s = time.perf_counter() - started
            for row in behind:
                row.unseen = False
                row.result.observe_s += observed_s / len(behind)
            timing.observe_s += observed_s
        else:
            timing.undrafted_steps += 1
        # 1. draft: every row at once (one drafter forward per drafting round where the kind batches)
        started = time.perf_counter()
        ready = []                                        # (row, depth); a row whose context is full drafts no step
        for row in live:
            row.step, depth = None, draft_depth(target, row.state, row.result, k, max_new_tokens, rule)
            if depth is not None:
                ready.append((row, depth if drafting else 0))
        drafts = propose_all([r.proposer for r, _ in ready], [r.state for r, _ in ready], [d for _, d in ready],
                             [r.sampler for r, _ in ready], tree)
        share = (time.perf_counter() - started) / max(1, len(ready))     # each row's part of the drafting
        for (row, depth), draft in zip(ready, drafts):
            row.step = take_draft(draft, depth, share, row.result, rule)
        timing.draft_s += time.perf_counter() - started
        for i, row in enumerate(rows):
            if row is not None and row.step is None:      # its context is full
                results[row.index], rows[i] = row.result, None
        _retain(rows, cache, force=True)                  # the verify forward reads live rows only
        live = rows
        if not live:
            continue
        if rule is not None and drafting:   # --k auto: one verify width for the whole step (module docstring)
            width = common_width(rule, [r.step for r in live])
            for row in live:
                row.step.cut(width - 1)
        # 2. verify every row in one forward; 3. accept per row
        started = time.perf_counter()
        inputs = [[r.state.tokens[-1]] + r.step.tokens for r in live]
        outs = target.forward_rows(inputs, cache, layers, [None if r.step.chain else r.step.parents for r in live])
        settled = [settle(r.step, out.logits, r.result, sampling, r.sampler.generator, eos, max_new_tokens)
                   for r, out in zip(live, outs)]
        verify_s = time.perf_counter() - started
        timing.verify_s += verify_s
        timing.steps += 1
        timing.rows.append(len(live))
        timing.width.append(max(len(x) for x in inputs))
        # 4. keep each row's root and accepted path; finished rows leave; the proposers observe their rows at the
        # next step that drafts (above)
        started = time.perf_counter()
        kept = []
        for row, out, (path, new) in zip(live, outs, settled):
            result = row.result
            result.verify_s += verify_s / len(live)
            if rule is not None and drafting:
                rule.update(row.step.conf, row.step.parents, path, row.step.drafted, row.step.draft_s,
                            row.step.draft_s + verify_s / len(live), len(new))
            state, keep_rows = advance(row.state, new, path, out.hidden)
            row.state, row.unseen = (unseen_since(row.state, state) if row.unseen else state), True
            kept.append(keep_rows)
        cache.keep(kept)
        emitted, stepped = sum(len(new) for _, new in settled), len(live)
        for i, row in enumerate(rows):
            if row is not None and (row.result.stop_reason == "eos" or len(row.result.tokens) >= max_new_tokens):
                results[row.index], rows[i] = row.result, None
        _retain(rows, cache, force=not waiting)           # a waiting prompt takes a finished row's slot
        timing.keep_s += time.perf_counter() - started
        if gate is not None:
            gate.record(drafting, emitted, stepped, time.perf_counter() - step_started, observed_s)
    return results


def unseen_since(older: DecodeState, newer: DecodeState) -> DecodeState:
    """The state after two steps that a proposer has not observed: the newer tokens, and the target's hidden
    states of both steps' kept positions, from the first position the proposer has not seen."""
    if newer.hidden_start != older.committed:
        raise ValueError(f"the newer state's hidden states start at {newer.hidden_start}, the older state "
                         f"committed {older.committed}")
    return DecodeState(newer.tokens, newer.committed, [torch.cat([a, b]) for a, b in zip(older.hidden, newer.hidden)],
                       older.hidden_start)


def common_width(rule, steps: list[StepDraft]) -> int:
    """The verify width (root + nodes) of a batched step under --k auto. Every row pays for the widest row's
    width (padding), so after each row's own choice the step keeps the width w that maximises the batch's
    expected tokens per second: Σ_rows (1 + Σ of the row's first w-1 nodes' path values) / cost(w), where cost is
    the batched forward's cost curve (each row's share x the rows, the same for every w) and a row's nodes are
    best first (their values from the rule: its calibration, or the drafter's predicted acceptance)."""
    values = [rule.path_values(s.conf, s.parents, s.accept) for s in steps]
    best_width, best_rate = 1, 0.0
    for width in range(1, 2 + max(len(s.tokens) for s in steps)):
        tokens = sum(1 + sum(v[: width - 1]) for v in values)
        rate = tokens / max(rule.curve(width), 1e-9)
        if rate > best_rate:
            best_width, best_rate = width, rate
    return best_width


def _join(target, proposer, prompts, waiting, rows, cache, results, batch_size, generators, sampling, rule, eos,
          max_new_tokens, timing) -> None:
    """0. Waiting prompts take free rows (a finished row's slot first), each prefilled alone."""
    while waiting:
        free = next((i for i, r in enumerate(rows) if r is None), len(rows) if len(rows) < batch_size else None)
        if free is None:
            return
        index = waiting.popleft()
        started = time.perf_counter()
        own = fork(proposer)
        sampler = make_sampler(sampling, generators[index], rule)
        single = target.new_cache()         # prefilled alone, as in batch 1, then copied into the batch's cache
        state, result = prefill(target, own, prompts[index], single, sampler, eos)
        timing.prefill_s += time.perf_counter() - started
        if result.stop_reason == "eos" or len(result.tokens) >= max_new_tokens:
            results[index] = result          # done at its first token: it never takes a row
            continue
        cache.put(free, single)
        row = _Row(index, own, sampler, state, result)
        if free == len(rows):
            rows.append(row)
        else:
            rows[free] = row


def _retain(rows: list, cache: RaggedCache, force: bool) -> None:
    """Finished rows leave the cache (with `force`; else their slots wait for the next prompts)."""
    if not force or all(r is not None for r in rows):
        return
    keep = [i for i, r in enumerate(rows) if r is not None]
    cache.retain(keep)
    rows[:] = [rows[i] for i in keep]
