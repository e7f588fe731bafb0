"""Reports: report.json (everything), report.md (the table a person reads), acceptance.png."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from draftsmith.eval.metrics import CALIBRATION_TOLERANCE, PromptRecord
from draftsmith.folders import check_output_folder, disk_full_said, marker_kind, write_marker
from draftsmith.metric_modules.acceptance.acceptance_figures import request_tau

REPORT_FILES = ("report.json", "report.md", "acceptance.png")
MD_POSITIONS = 16
"""Draft positions report.md shows (α_i, accepted lengths); report.json keeps every one of them."""


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse to write into a non-empty folder unless asked, and then only over an earlier eval report
    (folders.py has the rule); called before any work starts."""
    return check_output_folder(out, overwrite, "eval")


def prompt_row(r: PromptRecord, greedy: bool) -> dict:
    row = {"id": r.id, "turn": r.turn, "category": r.extra.get("category"), "prompt_tokens": r.prompt_tokens,
           "new_tokens": len(r.sd_tokens), "ar_new_tokens": len(r.ar_tokens), "steps": len(r.emitted),
           "tau": request_tau(r.emitted),
           "accepted": sum(r.accepted), "proposed": sum(r.proposed),
           "ar_s": r.ar_s, "sd_s": r.sd_s, "hf_assisted_s": r.hf_s,
           "speedup": r.ar_s / r.sd_s if r.sd_s else None, "timing_order": r.timing_order,
           "lossless_match": (r.sd_tokens == r.ar_tokens) if greedy else None,
           "divergence": r.divergence, "hf_assisted_divergence": r.hf_divergence}
    return row


def _fmt(x, spec=".3f") -> str:
    if x is None:
        return "n/a"
    return format(x, spec) if isinstance(x, float) else str(x)


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [
        f"# draftsmith eval: {c['drafter']} drafting for {c['target']}",
        "",
        f"bench `{c['bench']}` ({report['num_prompts']} prompts), k={c['k']}, tree={c.get('tree') or 'none'}, "
        f"temperature={c['temperature']}, "
        f"top_p={c['top_p']}, top_k={c['top_k']}, max_new_tokens={c['max_new_tokens']}, "
        f"dtype {c['dtype']}, device {c['device']} ({report['environment']['device_name']})",
        "",
        "| metric | value |", "|---|---|",
    ]
    if report.get("interrupted"):
        i = report["interrupted"]
        sizes = (f" and batch sizes {', '.join(map(str, i['batch_sizes_done']))} of "
                 f"{', '.join(map(str, i['batch_sizes_planned']))}" if "batch_sizes_done" in i else "")
        lines[3:3] = [f"**Interrupted: {i['prompts_done']} of {i['prompts_planned']} prompts{sizes} ran; "
                      "every figure covers those.**", ""]
    keys = ["tau", "tau_per_request_mean", "acceptance_rate", "steps", "new_tokens", "ar_tokens_per_s",
            "sd_tokens_per_s", "speedup", "nodes_per_step", "unplaced_nodes_per_step", "draft_ms_per_step",
            "verify_ms_per_step",
            "hf_assisted_tokens_per_s", "hf_assisted_speedup",
            "lossless_match_rate", "hf_assisted_match_rate", "divergences_not_near_tie"]
    keys += ["confidence_abs_gap"] if report.get("confidence_abs_gap") is not None else []
    keys += ["speedup_over_fastest_plain"] if "speedup_over_fastest_plain" in report else []
    lines += [f"| {k} | {_fmt(report.get(k))} |" for k in keys]
    base = report.get("baseline")
    if base:
        lines.append(f"| baseline | {base['decoder']}, {base['dtype']}, {base['forward']} |")
    source = (report.get("draft_length") or {}).get("acceptance_source")
    if source:
        lines.append(f"| draft_length acceptance_source | {source} |")
    floor = (report.get("timing") or {}).get("null_drafter_floor")
    if floor and floor["speedup"] is not None:
        lines.append(f"| null_drafter_floor | {floor['speedup']:.3f} (the same decoder with a drafter that proposes "
                     f"nothing, first {floor['prompts']} prompts: a speedup within {abs(floor['speedup'] - 1):.3f} "
                     "of 1.0 is noise) |")
    lines += [f"| acceptance_by_position | {_positions(report['acceptance_by_position'])} |",
              f"| accepted_length_histogram | {_histogram(report['accepted_length_histogram'])} |", ""]
    if report.get("timing"):
        lines += [f"Timing order: {report['timing']['order']} (per prompt in report.json).", ""]
    dl = report.get("draft_length") or {}
    if dl.get("mode") == "auto":
        curve = dl["cost_curve"]
        lines += ["## Draft length (--k auto)", "",
                  f"draft nodes verified per step: {dl['nodes_per_step_histogram']}; drafting "
                  f"{dl['draft_ms_per_node']:.2f} ms per node", "",
                  "| target forward, new tokens | " + " | ".join(str(n) for n in curve["tokens"]) + " |",
                  "|---|" + "---|" * len(curve["tokens"]),
                  "| ms | " + " | ".join(f"{ms:.1f}" for ms in curve["ms"]) + " |", ""]
    lines += _batched(report.get("batched"))
    lines += _precisions(report)
    reliability = report.get("confidence_reliability")
    if reliability:
        lines += ["## Confidence head reliability", "",
                  "Over the verified draft nodes whose parent was accepted: the head's mean predicted acceptance "
                  "against the share the verifier accepted (with its 95% interval), per draft position; calibrated: "
                  "|gap| <= 0.05, or the prediction inside the interval (too few nodes to tell).", "",
                  "| position | predicted | measured | 95% interval | nodes | abs gap | calibrated |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['position']} | {r['predicted']:.3f} | {r['measured']:.3f} | "
                  f"{r['measured_ci95'][0]:.3f}-{r['measured_ci95'][1]:.3f} | {r['count']} | {r['abs_gap']:.3f} | "
                  f"{_calibrated(r)} |" for r in reliability[:MD_POSITIONS]]
        if len(reliability) > MD_POSITIONS:
            lines.append(f"| … | positions {MD_POSITIONS + 1}..{reliability[-1]['position']} in report.json | | | | | |")
        lines.append("")
    diverged = [row for row in report["prompts"] if row["divergence"]]
    if diverged:
        lines += ["## Greedy divergences from the baseline", "",
                  "| prompt | turn | position | baseline token | SD token | target top-2 margin | ulp | near-tie |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['id']} | {r['turn']} | {r['divergence']['position']} | {r['divergence']['baseline_token']} "
                  f"| {r['divergence']['token']} | {r['divergence']['top2_margin']:.4f} | {r['divergence']['ulp']:.2g} "
                  f"| {'yes' if r['divergence']['near_tie'] else 'NO: defect'} |" for r in diverged]
        lines.append("")
    lines += ["## Per prompt", "", "| prompt | turn | prompt tokens | new tokens | steps | τ | AR s | SD s | HF assisted s | speedup |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['turn']} | {r['prompt_tokens']} | {r['new_tokens']} | {r['steps']} | {_fmt(r['tau'], '.2f')} "
              f"| {_fmt(r['ar_s'], '.2f')} | {_fmt(r['sd_s'], '.2f')} | {_fmt(r['hf_assisted_s'], '.2f')} "
              f"| {_fmt(r['speedup'], '.2f')} |" for r in report["prompts"]]
    return "\n".join(lines) + "\n"


def _precisions(report: dict) -> list[str]:
    """Plain decoding in each precision asked (--plain-dtypes), the run's own first (eval/precision_eval.py), and
    what speculative decoding would need to beat the fastest of them."""
    rows, sd_tokens_per_s = report.get("plain_by_dtype"), report.get("sd_tokens_per_s")
    if not rows:
        return []
    lines = ["## Plain decoding in each precision", "",
             "The same prompts, in this run: the run's own plain decoding, then the target loaded in each of "
             "--plain-dtypes. `same outputs`: its outputs equal to this run's plain outputs (another precision may "
             "round a greedy choice otherwise; losslessness is judged in the run's own precision).", "",
             "| dtype | forward | plain tok/s | SD tok/s over it | same outputs |", "|---|---|---|---|---|"]
    for r in rows:
        over = sd_tokens_per_s / r["plain_tokens_per_s"] if sd_tokens_per_s and r["plain_tokens_per_s"] else None
        same = "(this run)" if r.get("this_run") else _fmt(r.get("same_outputs_as_run"))
        lines.append(f"| {r['dtype']} | {r['forward']} | {_fmt(r['plain_tokens_per_s'], '.1f')} | {_fmt(over, '.3f')} "
                     f"| {same} |")
    lines.append("")
    over, even, best = report.get("speedup_over_fastest_plain"), report.get("break_even_tau"), report["fastest_plain"]
    if over and even:
        cost = f"at this run's cost per step it breaks even at τ {even:.2f} (τ {report['tau']:.2f})"
        lines += [f"**Speculative decoding is slower than {best['dtype']} plain decoding here** ({over:.3f}x): {cost}. "
                  f"Raise acceptance (a longer-trained drafter) or cheapen a step, or decode plainly in {best['dtype']}."
                  if over < 1 else f"Speculative decoding is {over:.3f}x the fastest plain decoding ({best['dtype']}): "
                  f"{cost}.", ""]
    return lines


def _batched(rows: list | None) -> list[str]:
    """The batch-size table (--batch-size): plain vs speculative tokens/s at each batch size, in this run."""
    if not rows:
        return []
    lines = ["## Batch sizes", "",
             "Plain and speculative decoding at each batch size, the same prompts, in this run (batch 1: the per-prompt "
             "pass above; larger: continuous batching). Lossless: greedy outputs equal to the batch-1 plain outputs.", "",
             "| batch | plain tok/s | SD tok/s | speedup | τ | α1..α4 | lossless | plain = batch 1 | not near-tie |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        alphas = " ".join(_fmt(a, ".2f") for a in (r.get("acceptance_by_position") or [])[:4])
        lines.append(f"| {r['batch_size']} | {_fmt(r['plain_tokens_per_s'], '.1f')} | {_fmt(r['sd_tokens_per_s'], '.1f')} "
                     f"| {_fmt(r['speedup'], '.3f')} | {_fmt(r['tau'], '.3f')} | {alphas} "
                     f"| {_fmt(r.get('lossless_match_rate'))} | {_fmt(r.get('plain_match_rate', 1.0 if r['batch_size'] == 1 else None))} "
                     f"| {_fmt(r.get('divergences_not_near_tie'))} |")
    split = [r for r in rows if r.get("sd_time_split")]
    if split:
        lines += ["", "Speculative decoding's time per batched step (ms): drafting (every row), the batched verify "
                  "forward with acceptance, cache compaction, the drafters' observe; rows per step and verify width; "
                  "steps run without drafts where drafting measurably lost (--k auto).", "",
                  "| batch | steps | without drafts | draft | verify | keep | observe | rows/step | width |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in split:
            t = r["sd_time_split"]
            lines.append(f"| {r['batch_size']} | {t['steps']} | {_fmt(t.get('undrafted_steps'))} "
                         f"| {_fmt(t['draft_ms_per_step'], '.1f')} "
                         f"| {_fmt(t['verify_ms_per_step'], '.1f')} | {_fmt(t['keep_ms_per_step'], '.2f')} "
                         f"| {_fmt(t['observe_ms_per_step'], '.1f')} | {_fmt(t['mean_rows_per_step'], '.1f')} "
                         f"| {_fmt(t['mean_verify_width'], '.1f')} |")
    return lines + [""]


def _positions(alphas: list) -> str:
    """α_1..α_16 at most; deeper positions (a --k 1000 run) are in report.json only."""
    shown = " ".join(f"α{i + 1}={_fmt(a, '.3f')}" for i, a in enumerate(alphas[:MD_POSITIONS]))
    return shown + (f" … (α{MD_POSITIONS + 1}..α{len(alphas)} in report.json)" if len(alphas) > MD_POSITIONS else "")


def _histogram(hist: list[int]) -> str:
    shown = str(hist[:MD_POSITIONS + 1])
    return shown + (f" … ({len(hist) - MD_POSITIONS - 1} more in report.json)" if len(hist) > MD_POSITIONS + 1 else "")


def plot_acceptance(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [a if a is not None else 0.0 for a in report["acceptance_by_position"]]
    hist = report["accepted_length_histogram"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.bar(range(1, len(alphas) + 1), alphas, color="tab:blue")
    ax1.set(xlabel="draft position i", ylabel="α_i", ylim=(0, 1), title="acceptance by position")
    ax2.bar(range(len(hist)), hist, color="tab:green")
    ax2.set(xlabel="drafts accepted in a step", ylabel="verify steps", title=f"accepted lengths (τ={_fmt(report['tau'], '.2f')})")
    fig.suptitle(f"{report['config']['drafter']} → {report['config']['target']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, records: list[PromptRecord], out: str | Path, save_tokens: bool = True) -> Path:
    """Write the three files into a temporary folder first, then move them in: a crash leaves no
    half-written report behind."""
    out = Path(out)
    report = dict(report)
    greedy = report["config"]["temperature"] == 0
    report["prompts"] = [prompt_row(r, greedy) for r in records]
    with disk_full_said("the eval report could not be written", out,
                        "Free some space (or choose another --out), then run the eval again"):
        out.mkdir(parents=True, exist_ok=True)
        if marker_kind(out) is None:     # what --overwrite checks before replacing this report (folders.py)
            write_marker(out, "eval")
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
        try:
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            (tmp / "report.md").write_text(markdown(report))
            plot_acceptance(report, tmp / "acceptance.png")
            if save_tokens:
                (tmp / "outputs.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
            for name in os.listdir(tmp):
                os.replace(tmp / name, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _calibrated(row: dict) -> str:
    if row["abs_gap"] <= CALIBRATION_TOLERANCE:
        return "yes"
    return "within noise" if row["calibrated"] else "no"
