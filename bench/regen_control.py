"""The control set for a regenerated-data experiment (issue 12): the same conversations as a
`draftsmith data regenerate` folder, with the source's original answers instead of the target's.

A head trained on the regenerated folder and one trained on this file see the same user turns, the
same number of conversations and assistant turns, and the same number of epochs at equal steps;
only who wrote the answers differs. Writes ShareGPT JSONL (`data.source=FILE` reads it).

  python bench/regen_control.py data/regen --out data/regen-control.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from draftsmith.distill.sources import load_conversations

ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("regenerated", type=Path, help="a data regenerate output folder")
    ap.add_argument("--out", type=Path, required=True, help="the control JSONL to write")
    args = ap.parse_args()
    if not (args.regenerated / "manifest.json").is_file():
        sys.exit(f"error: not a `draftsmith data regenerate` folder (no manifest.json): {args.regenerated}\n"
                 "Give the --out folder of a regeneration run.")
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; this script never replaces a file. Remove it or pick another --out.")
    manifest = json.loads((args.regenerated / "manifest.json").read_text())
    source = {c["id"]: c for c in load_conversations(manifest["plan"]["source"])}
    written = turns = 0
    with args.out.open("w") as f:
        for shard in sorted((args.regenerated / "shards").glob("*.jsonl")):
            for line in shard.read_text().splitlines():
                record = json.loads(line)
                answers = sum(t["from"] == "gpt" for t in record["conversations"])
                out, seen = [], 0
                for m in source[record["id"]]["messages"]:
                    if m["role"] == "assistant":
                        if seen == answers:
                            break
                        seen += 1
                    out.append({"from": ROLE[m["role"]], "value": m["content"]})
                f.write(json.dumps({"id": record["id"], "conversations": out}) + "\n")
                written += 1
                turns += seen
    print(f"wrote {args.out}: {written} conversations, {turns} original answers")


if __name__ == "__main__":
    main()
