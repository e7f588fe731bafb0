"""The objective bake-off's table (bench/objective_bakeoff.sh): one row per trained head, read from its run's
summary.json (tokens, tokens/s, peak RSS, held-out figures) and its `draftsmith eval` reports.

    python bench/objective_table.py runs/bakeoff
"""

import json
import sys
from pathlib import Path


def _report(run: Path, pattern: str) -> dict | None:
    hits = sorted(run.glob(pattern))
    return json.loads((hits[0] / "report.json").read_text()) if hits and (hits[0] / "report.json").is_file() else None


def _eval_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    alphas = "/".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_by_position"][:4])
    return f"{r['tau']:.3f} ({alphas}) {r['speedup']:.2f}x {r['lossless_match_rate']:.3f}"


def rows(root: Path) -> list[str]:
    out = []
    for run in sorted(p for p in root.iterdir() if (p / "summary.json").is_file()):
        s = json.loads((run / "summary.json").read_text())
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rates = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x]
        steps = "/".join(f"{s.get(f'ttt_greedy_match_step{i}', float('nan')):.3f}" for i in range(4))
        cells = [_eval_cell(_report(run, f"eval-{b}*-k{k}")) for b in ("mt_bench", "humaneval") for k in ("4", "auto")]
        out.append(f"| {run.name} | {s['tokens']:,} | {sum(rates) / max(1, len(rates)):.0f} | {s['peak_rss_gib']:.2f} | "
                   f"{steps} | {s.get('ttt_tau_greedy_k4', float('nan')):.3f} | " + " | ".join(cells) + " |")
    return out


def main(root: str) -> None:
    print("| objective | tokens | train tok/s | peak RSS GiB | held-out greedy match TTT 0/1/2/3 | held-out TTT τ(k=4) "
          "| MT-bench k=4: τ (α1..α4) speedup lossless | MT-bench auto | HumanEval k=4 | HumanEval auto |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows(Path(root))))


if __name__ == "__main__":
    main(sys.argv[1])
