"""Print one markdown table from several `draftsmith eval` reports (each run compares its drafter
with plain decoding on the same prompts, interleaved per prompt).

    python bench/drafter_table.py runs/eagle3-ttt-quick/eval-mtbench80 runs/eagle-kd-quick/eval-mtbench80 ...
"""

import json
import sys
from pathlib import Path


def row(folder: Path) -> str:
    r = json.loads((folder / "report.json").read_text())
    c = r["config"]
    k = c.get("k", 4)
    alphas = " ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_by_position"][: k if isinstance(k, int) else 4])
    return (f"| {c['drafter']} | {c['bench']} | {r['num_prompts']} | {c['max_new_tokens']} | {k} | "
            f"{r['tau']:.3f} ({r['tau_per_request_mean']:.3f}) | {alphas} | {r['draft_ms_per_step']:.1f} | {r['ar_tokens_per_s']:.1f} | "
            f"{r['sd_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['lossless_match_rate']:.3f} |")


def main(folders: list[str]) -> None:
    print("| drafter | bench | prompts | max new | k | τ pooled (per-request) | α1..αk | draft ms/step | AR tok/s | SD tok/s | speedup | lossless |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in folders:
        print(row(Path(f)))


if __name__ == "__main__":
    main(sys.argv[1:])
