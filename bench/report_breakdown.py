"""Where a drafter's τ comes from in one `draftsmith eval` report: τ per prompt category, and — for an
EAGLE-3 head — the share of the target's own tokens that its draft vocabulary cannot propose (a
ceiling on every α).

    python bench/report_breakdown.py runs/eagle3-ttt-gpu/eval-mt_bench80 [--drafter runs/eagle3-ttt-gpu/speculators]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def category_tau(report: dict) -> dict[str, float]:
    """Pooled τ per category: Σ tokens emitted by verify steps / Σ verify steps, as `tau` is pooled."""
    emitted, steps = defaultdict(int), defaultdict(int)
    for row in report["prompts"]:
        key = row.get("category") or "all"
        emitted[key] += round(row["tau"] * row["steps"])
        steps[key] += row["steps"]
    return {key: emitted[key] / steps[key] for key in sorted(steps) if steps[key]}


def outside_draft_vocab(outputs: Path, drafter: Path) -> tuple[int, int]:
    """(target tokens outside the head's draft vocabulary, all target tokens) over outputs.jsonl."""
    from draftsmith.models.formats import read_head_folder

    in_vocab = read_head_folder(drafter).t2d.bool()
    outside = total = 0
    for line in outputs.read_text().splitlines():
        tokens = json.loads(line)["ar_tokens"]
        total += len(tokens)
        outside += sum(1 for t in tokens if not in_vocab[t])
    return outside, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("report_dir", type=Path)
    p.add_argument("--drafter", type=Path, default=None, help="an eagle3 head folder (draft vocabulary check)")
    args = p.parse_args()
    report = json.loads((args.report_dir / "report.json").read_text())
    print(f"{report['config']['bench']}: tau {report['tau']:.3f} over {report['num_prompts']} prompts")
    for key, tau in category_tau(report).items():
        print(f"  {key:<12} tau {tau:.3f}")
    if args.drafter is not None:
        outside, total = outside_draft_vocab(args.report_dir / "outputs.jsonl", args.drafter)
        print(f"target tokens outside the draft vocabulary: {outside} of {total} ({outside / total:.1%})")


if __name__ == "__main__":
    main()
