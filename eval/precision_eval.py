"""`draftsmith eval --plain-dtypes fp32`: plain decoding of the same prompts in other precisions of the same target,
in the same run, after the batch-1 pass (eval/harness.py).

The speedup that counts is against the fastest plain decoding of the target on this machine, and which precision
that is depends on the machine: on an AMD EPYC (AVX512-BF16) SmolLM2's compiled bf16 forward costs 26 ms to fp32's
37 (bench/results/cpu-row-attention). Each precision asked gets its own target (loaded from the same spec; compiled
with the run's static cache size under --compile), a warm-up, and every prompt of the batch-1 pass decoded greedily
or sampled as the run was. Its row: tokens/s, the forward it ran, and how many of its outputs equal the run's plain
outputs (another precision rounds otherwise, so a greedy output may change: that is the precision's choice, not
speculative decoding's; losslessness is judged against the run's own precision). The report then names the fastest
plain decoding and the speculative decoder's speedup over it (`speedup_over_fastest_plain`).
"""

from __future__ import annotations

import time

import torch

from draftsmith.eval.decoder import autoregressive_generate
from draftsmith.metric_modules.speedup.speedup_figures import tokens_per_s
from draftsmith.models import load_target


def precision_row(runner, dtype: str, prompts: list[list[int]], reference: list[list[int]]) -> dict:
    """Plain decoding of `prompts` by the run's target loaded in `dtype` (module docstring). `reference`: the run's
    plain outputs of the same prompts."""
    cfg = runner.cfg
    target = load_target(cfg.target, dtype, cfg.device)
    if runner.target.compiled is not None:
        target.compile(runner.target.static_length)
    limits = dict(sampling=cfg.sampling, eos_token_ids=runner.eos)
    autoregressive_generate(target, prompts[0], generator=torch.Generator().manual_seed(cfg.seed),
                            max_new_tokens=min(16, cfg.max_new_tokens), **limits)          # warm-up: the graphs
    outputs, seconds = [], 0.0
    for i, prompt in enumerate(prompts):
        started = time.perf_counter()
        result = autoregressive_generate(target, prompt, generator=torch.Generator().manual_seed(cfg.seed + i),
                                         max_new_tokens=cfg.max_new_tokens, **limits)
        seconds += time.perf_counter() - started
        outputs.append(result.tokens)
    tokens = sum(map(len, outputs))
    return {"dtype": str(target.dtype).replace("torch.", ""), "forward": target.describe_forward(),
            "plain_tokens_per_s": tokens_per_s(tokens, seconds), "plain_s": seconds, "new_tokens": tokens,
            "prompts": len(prompts),
            "same_outputs_as_run": sum(a == b for a, b in zip(outputs, reference)) / len(prompts)}


def fastest_plain(report: dict, rows: list[dict]) -> None:
    """Add the table's own row (the run's plain decoding), the fastest plain decoding, the speculative decoder's
    speedup over it and the τ at which it would break even to `report`."""
    own = {"dtype": report["baseline"]["dtype"], "forward": report["baseline"]["forward"],
           "plain_tokens_per_s": report["ar_tokens_per_s"], "this_run": True}
    table = [own] + rows
    fastest = max((r for r in table if r["plain_tokens_per_s"]), key=lambda r: r["plain_tokens_per_s"], default=own)
    report["plain_by_dtype"] = table
    report["fastest_plain"] = {"dtype": fastest["dtype"], "plain_tokens_per_s": fastest["plain_tokens_per_s"]}
    sd = report.get("sd_tokens_per_s")
    report["speedup_over_fastest_plain"] = sd / fastest["plain_tokens_per_s"] if sd and fastest["plain_tokens_per_s"] \
        else None
    over, tau = report["speedup_over_fastest_plain"], report.get("tau")
    # the τ at which this run's steps, at their measured cost, would emit tokens as fast as the fastest plain decoding
    report["break_even_tau"] = tau / over if over and tau else None
