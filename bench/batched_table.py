"""The table of bench/batched_decoding.sh from its eval reports: one row per (dtype, forward, batch size).

    python bench/batched_table.py bench/results/cpu-batched-decoding
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(folder: Path):
    for report_path in sorted(folder.glob("*/report.json")):
        r = json.loads(report_path.read_text())
        base = r.get("baseline") or {}
        dtype, forward = base.get("dtype", r["config"]["dtype"]), (base.get("forward") or "eager").split(" ")[0]
        sizes = r.get("batched") or [{"batch_size": 1, "plain_tokens_per_s": r["ar_tokens_per_s"],
                                      "sd_tokens_per_s": r["sd_tokens_per_s"], "speedup": r["speedup"],
                                      "tau": r["tau"], "acceptance_by_position": r["acceptance_by_position"],
                                      "lossless_match_rate": r["lossless_match_rate"],
                                      "divergences_not_near_tie": r["divergences_not_near_tie"]}]
        for s in sizes:
            yield report_path.parent.name, dtype, forward, s, r


def main(folder: str) -> None:
    table = list(rows(Path(folder)))
    if not table:
        sys.exit(f"no eval reports under {folder}")
    fastest = {}      # batch size -> the fastest plain decoding measured at it, over the runs in the folder
    for _, _, _, s, _ in table:
        fastest[s["batch_size"]] = max(fastest.get(s["batch_size"], 0.0), s["plain_tokens_per_s"])
    print("| run | dtype | forward | batch | plain tok/s | SD tok/s | SD / plain | SD / fastest plain at this batch "
          "| τ | α1 α2 α3 | steps without drafts | lossless | not near-tie |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, dtype, forward, s, _ in table:
        alphas = " ".join(f"{a:.2f}" if a is not None else "-" for a in (s.get("acceptance_by_position") or [])[:3])
        vs_fastest = s["sd_tokens_per_s"] / fastest[s["batch_size"]]
        split = s.get("sd_time_split") or {}     # batch 1 and reports before DraftGate: none
        undrafted = f"{split['undrafted_steps']} / {split['steps']}" if "undrafted_steps" in split else "-"
        print(f"| {name} | {dtype} | {forward} | {s['batch_size']} | {s['plain_tokens_per_s']:.1f} "
              f"| {s['sd_tokens_per_s']:.1f} | {s['speedup']:.3f} | {vs_fastest:.3f} "
              f"| {s['tau']:.3f} | {alphas} | {undrafted} | {s.get('lossless_match_rate')} "
              f"| {s.get('divergences_not_near_tie')} |")
    r = table[0][4]
    print(f"\n{r['num_prompts']} prompts, {r['config']['max_new_tokens']} new tokens, drafter {r['config']['drafter']}, "
          f"k {r['config']['k']}; {r['environment']['torch_threads']} threads, {r['environment']['device_name']}, "
          f"torch {r['environment']['torch']}, tree {r['config'].get('tree')}. Fastest plain decoding here, tok/s by batch "
          f"size: {', '.join(f'{b}: {v:.1f}' for b, v in sorted(fastest.items()))}. (Runs of one folder ran one "
          f"after another: compare within a run.)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/cpu-batched-decoding")
