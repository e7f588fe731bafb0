"""`draftsmith eval --batch-size 1,4,16`: plain and speculative decoding of the same prompts at each batch size,
in one run, after the batch-1 pass (eval/harness.py) that every batched output is checked against.

At each batch size > 1 both decoders run every prompt with continuous batching (eval/batched.py): the
batched plain-decoding baseline, then the speculative decoder with the same drafter, draft length and tree
(their order alternates by batch size, as the batch-1 pass alternates by prompt). A row of the table holds
tokens/s of both, their ratio, τ and α per position (equal to batch 1's up to `--k auto`'s choices: a check),
the per-step time split, and losslessness: greedy outputs at this batch size against the batch-1 plain outputs,
prompt by prompt, every difference audited (the target's top-2 margin there: a near-tie or a defect).
"""

from __future__ import annotations

import time

import torch

from draftsmith.eval.batched import BatchTiming, batched_generate
from draftsmith.eval.decoder import GenerationResult, NoDraft
from draftsmith.eval.draft_length import DraftLengthRule, measure_cost_curve
from draftsmith.metric_modules.acceptance.acceptance_figures import acceptance_figures
from draftsmith.metric_modules.speedup.speedup_figures import speedup, tokens_per_s


def batch_row(runner, batch_size: int, prompts: list[list[int]], reference: list[list[int]], ids: list[str],
              plain_first: bool, audit) -> dict:
    """One batch size's figures (module docstring). `reference`: the batch-1 plain outputs; `audit(i, tokens)`
    describes where prompt i's tokens first differ from its reference (None when equal)."""
    cfg, target, proposer = runner.cfg, runner.target, runner.proposer
    layers = tuple(proposer.hidden_layers)
    rule = None
    if cfg.k == "auto":
        rule = DraftLengthRule(measure_cost_curve(target, hidden_layers=layers, rows=batch_size))
    limits = dict(max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling, eos_token_ids=runner.eos)

    def gens():
        return [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(prompts))]

    def plain(timing, batch=prompts, size=batch_size, **kw):
        return batched_generate(target, NoDraft(), batch, batch_size=size, k=0, generators=gens(),
                                timing=timing, **{**limits, **kw})

    def speculative(timing, batch=prompts, size=batch_size, **kw):
        return batched_generate(target, proposer, batch, batch_size=size, k=cfg.depth, tree=cfg.tree_shape,
                                rule=rule, generators=gens(), timing=timing, **{**limits, **kw})

    # warm-up, a few tokens: the shapes of this batch size, and of its last row alone (a draining batch ends with
    # one; with --compile that is a graph of its own, built here rather than in the timed runs)
    for size in (batch_size, 1):
        warm = prompts[:size]
        plain(BatchTiming(), warm, size, max_new_tokens=min(8, cfg.max_new_tokens))
        speculative(BatchTiming(), warm, size, max_new_tokens=min(8, cfg.max_new_tokens))
    if rule is not None:                 # the warm-up's steps teach the rule nothing the timed run keeps
        rule = DraftLengthRule(rule.curve)
    runs = {}
    for name in (("plain", "speculative") if plain_first else ("speculative", "plain")):
        timing = BatchTiming()
        started = time.perf_counter()
        results = (plain if name == "plain" else speculative)(timing)
        runs[name] = (results, time.perf_counter() - started, timing)
    (ar, ar_s, ar_t), (sd, sd_s, sd_t) = runs["plain"], runs["speculative"]
    return _figures(cfg, batch_size, ar, ar_s, ar_t, sd, sd_s, sd_t, rule, reference, ids, plain_first, audit)


def _figures(cfg, batch_size, ar, ar_s, ar_t, sd, sd_s, sd_t, rule, reference, ids, plain_first, audit) -> dict:
    greedy = cfg.sampling.greedy
    acceptance = acceptance_figures([r.accepted for r in sd], [r.proposed for r in sd], [r.depth for r in sd],
                                    [r.emitted for r in sd], k=cfg.depth)
    ar_tokens, sd_tokens = sum(len(r.tokens) for r in ar), sum(len(r.tokens) for r in sd)
    row = {
        "batch_size": batch_size,
        "plain_tokens_per_s": tokens_per_s(ar_tokens, ar_s),
        "sd_tokens_per_s": tokens_per_s(sd_tokens, sd_s),
        "speedup": speedup(ar_tokens, ar_s, sd_tokens, sd_s),
        "tau": acceptance["tau"],
        "acceptance_by_position": acceptance["acceptance_by_position"],
        "nodes_per_step": acceptance["nodes_per_step"],
        "plain_s": ar_s, "sd_s": sd_s, "plain_new_tokens": ar_tokens, "sd_new_tokens": sd_tokens,
        "timing_order": "plain,sd" if plain_first else "sd,plain",
        "sd_time_split": sd_t.as_dict(sd_s),
        "plain_time_split": ar_t.as_dict(ar_s),
        "outputs": {"plain": [r.tokens for r in ar], "speculative": [r.tokens for r in sd]},
    }
    if rule is not None:
        row["draft_length"] = {"cost_curve_per_row": rule.curve.as_dict(), "nodes_per_step_histogram": rule.histogram()}
    if greedy:
        row["lossless_match_rate"] = _match(sd, reference)
        row["plain_match_rate"] = _match(ar, reference)
        row["divergences"] = [d for d in (_diverged(ids[i], audit(i, r.tokens), "speculative")
                                          for i, r in enumerate(sd)) if d] + \
                             [d for d in (_diverged(ids[i], audit(i, r.tokens), "plain") for i, r in enumerate(ar)) if d]
        row["divergences_not_near_tie"] = sum(1 for d in row["divergences"] if not d["near_tie"])
    return row


def _match(results: list[GenerationResult], reference: list[list[int]]) -> float:
    return sum(r.tokens == ref for r, ref in zip(results, reference)) / len(reference) if reference else None


def _diverged(prompt_id: str, info: dict | None, decoder: str) -> dict | None:
    return None if info is None else {"id": prompt_id, "decoder": decoder, **info}
