"""`draftsmith data regenerate`: the target answers every user turn of every conversation itself.

A drafter learns what the target says; trained on answers other models wrote it learns the wrong
distribution, and acceptance falls (SpecForge, speculators and ModelOpt all regenerate for this
reason; METHODS.md). Multi-turn conversations are regenerated turn by turn: the system prompt and
the user turns come from the source, and each answer is conditioned on the target's own earlier
answers, never on the source's.

    draftsmith data regenerate --target smollm2-135m-instruct --source sharegpt --out data/regen
    draftsmith data regenerate --target T --source S --out DIR --endpoint http://localhost:8000

Output folder:
    manifest.json          plan (target, source, sampling, shard size), engines, counts, versions;
                           "complete": true once every shard is written
    shards/NNNNN.jsonl     one ShareGPT record per line: {"id", "conversations": [{"from", "value"}],
                           "truncated"}; written atomically (temporary file + rename), so a killed
                           job restarts at the first missing shard with nothing duplicated or lost
    shards/NNNNN.json      the shard's counts (written before its .jsonl)
    conversations.jsonl    every shard's records in order, written when the last shard is

A conversation whose answer hit max_new_tokens is kept up to that answer and marked
`"truncated": true` (later turns would be conditioned on a cut answer, so none follow it).
A conversation stops early, unmarked, when the next prompt would not fit the context
(`max_prompt_tokens`) or the target answers with nothing; one with no answer at all is dropped.
Both are counted in the manifest. `data.source=DIR` and `draftsmith data prepare` read the folder
like any ShareGPT file (distill/sources.py); the held-out split keys on the source's ids, so it is
the same as the source's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from draftsmith import __version__ as draftsmith_version
from draftsmith.distill.dialogue import Dialogue, RegenerateConfig, answer_turns
from draftsmith.distill.endpoint import EndpointEngine
from draftsmith.distill.local_engine import BuiltinEngine
from draftsmith.distill.regenerated import FORMAT, STATS, read_manifest, read_shard, shard_path
from draftsmith.distill.sources import load_conversations
from draftsmith.errors import DraftsmithError
from draftsmith.folders import prepare_output_folder


# ------------------------------------------------------------------------------------ the folder

def _plan(cfg: RegenerateConfig, conversations: list[dict], shard_size: int, sampling: dict) -> dict:
    digest = hashlib.sha256()
    for c in conversations:
        digest.update(json.dumps(c, sort_keys=True).encode())
        digest.update(b"\n")
    return {"target": cfg.target, "source": cfg.source, "max_conversations": cfg.max_conversations,
            "conversations": len(conversations), "inputs_sha256": digest.hexdigest()[:20],
            "shard_size": shard_size, "shards": -(-len(conversations) // shard_size),
            "max_new_tokens": cfg.max_new_tokens, "max_prompt_tokens": cfg.max_prompt_tokens, "sampling": sampling}


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _open_folder(folder: Path, plan: dict, cfg: RegenerateConfig) -> None:
    """Start a new folder, or check that the folder's plan is this run's (then it is resumed)."""
    manifest = None if cfg.overwrite else read_manifest(folder)
    if manifest is not None:
        if manifest.get("format") != FORMAT:
            raise DraftsmithError("The output folder holds something else than regenerated conversations",
                                  f"{folder}: format {manifest.get('format')!r}", "Choose another --out")
        differ = {k: (manifest["plan"].get(k), v) for k, v in plan.items() if manifest["plan"].get(k) != v}
        if differ:
            raise DraftsmithError("The output folder holds a regeneration with another plan",
                                  ", ".join(f"{k}: folder {a!r}, now {b!r}" for k, (a, b) in differ.items()),
                                  "Rerun with the folder's settings to resume it, pass --overwrite, or choose another --out")
        return
    prepare_output_folder(folder, cfg.overwrite, "regenerated")   # refuses a folder draftsmith did not write
    manifest = {"format": FORMAT, "plan": plan, "complete": False, "engines": {}, "versions": versions()}
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def versions() -> dict:
    import torch
    import transformers

    return {"draftsmith": draftsmith_version, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def write_shard(folder: Path, index: int, dialogues: list[Dialogue], seconds: float, engine: str) -> dict:
    """Counts first, records last: the .jsonl's existence is what marks the shard done."""
    records = [r for r in (d.record() for d in dialogues) if r is not None]
    stats = {"conversations": len(records), "dropped": len(dialogues) - len(records),
             "answers": sum(d.answers for d in dialogues), "truncated": sum(d.truncated for d in dialogues),
             "stopped_context": sum(d.stopped == "context" for d in dialogues),
             "stopped_empty": sum(d.stopped == "empty" for d in dialogues),
             "new_tokens": sum(d.new_tokens for d in dialogues), "seconds": seconds, "engine": engine}
    path = shard_path(folder, index)
    _write_atomically(path.with_suffix(".json"), json.dumps(stats) + "\n")
    _write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return stats


def finalize(folder: Path, manifest: dict) -> dict:
    """Once every shard is written: conversations.jsonl and the counts; returns the manifest."""
    n = manifest["plan"]["shards"]
    if any(not shard_path(folder, i).is_file() for i in range(n)):
        return manifest
    totals = dict.fromkeys(STATS, 0)
    with open(folder / ".conversations.jsonl.tmp", "w", encoding="utf-8") as out:
        for i in range(n):
            stats, text = read_shard(folder, i)
            for key in STATS:
                totals[key] += stats[key]
            out.write(text)
    os.replace(folder / ".conversations.jsonl.tmp", folder / "conversations.jsonl")
    totals["new_tokens_per_s"] = totals["new_tokens"] / max(totals["seconds"], 1e-9)
    manifest = {**manifest, "counts": totals, "complete": True}
    _write_atomically(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


# --------------------------------------------------------------------------------------- the run

def _distributed():
    """(rank, world size, barrier) under `accelerate launch` / torchrun, else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone


def _make_engine(cfg: RegenerateConfig, rank: int):
    if cfg.endpoint is not None:
        return EndpointEngine(cfg)
    return BuiltinEngine(cfg, rank)


def regenerate(cfg: RegenerateConfig) -> dict:
    """Regenerate `cfg.source` with the target into `cfg.out`; returns the manifest (on the main process;
    {} on the others of an `accelerate launch`)."""
    from tqdm.auto import tqdm

    rank, world, barrier = _distributed()
    conversations = load_conversations(cfg.source)[: cfg.max_conversations]
    if not conversations:
        raise DraftsmithError("The source holds no conversation to regenerate", cfg.source)
    engine = _make_engine(cfg, rank)
    shard_size = cfg.shard_size or 8 * engine.parallelism
    folder = Path(cfg.out)
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}
    if (folder / "manifest.json").is_file() and cfg.shard_size is None and not cfg.overwrite:
        shard_size = (read_manifest(folder).get("plan") or {}).get("shard_size", shard_size)   # resume as planned
    plan = _plan(cfg, conversations, shard_size, sampling)
    if rank == 0:
        _open_folder(folder, plan, cfg)
    barrier()
    missing = [i for i in range(plan["shards"]) if not shard_path(folder, i).is_file()]
    mine = missing[rank::world]
    chunks = {i: conversations[i * shard_size:(i + 1) * shard_size] for i in mine}
    turns = sum(answer_turns(c["messages"]) for chunk in chunks.values() for c in chunk)
    if rank == 0:
        print(f"[draftsmith] {plan['conversations']} conversations in {plan['shards']} shards of {shard_size}, "
              f"{plan['shards'] - len(missing)} already written; engine {engine.describe()['engine']}; "
              f"{turns} answers to write on this process", flush=True)
    bar = tqdm(total=turns, unit="answer", desc="regenerate", disable=rank != 0, dynamic_ncols=True)
    start, tokens = time.time(), 0

    def progress(answers: int, new_tokens: int) -> None:
        nonlocal tokens
        tokens += new_tokens
        bar.update(answers)
        bar.set_postfix(tok_s=f"{tokens / max(time.time() - start, 1e-9):.0f}", refresh=False)

    for index in mine:
        import torch

        torch.manual_seed(cfg.seed + index)
        dialogues = [Dialogue(id=c["id"], source=c["messages"]) for c in chunks[index]]
        began = time.time()
        engine.run(dialogues, progress, first_index=index * shard_size)
        write_shard(folder, index, dialogues, time.time() - began, engine.describe()["engine"])
    bar.close()
    barrier()
    if rank != 0:
        return {}
    manifest = read_manifest(folder)
    manifest["engines"] = {**manifest.get("engines", {}), engine.describe()["engine"]: engine.describe()}
    _write_atomically(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return finalize(folder, manifest)
