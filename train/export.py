"""`draftsmith export RUN_DIR --format hf|speculators|sglang --out DIR`.

hf: draftsmith's own folder (a transformers LM for small_lm; config + safetensors for the heads),
with the tokenizer. speculators / sglang: the EAGLE (eagle, eagle3; P-EAGLE as speculators' peagle)
checkpoints that vLLM and SGLang load (models/formats.py, docs/formats.md); speculators also takes the
block drafters (dflash, dspark: speculators' dflash / dspark types, models/block_formats.py). Every
export carries a model card and draftsmith.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import yaml

from draftsmith.assets import TARGETS
from draftsmith.errors import DraftsmithError
from draftsmith.folders import check_output_folder, disk_full_said, replace_folder, write_marker
from draftsmith.models.formats import (read_head_folder, strip_target_leftovers, target_embedding, write_sglang,
                                       write_speculators)
from draftsmith.models.lora import merged_from_folder
from draftsmith.models.target import resolve_model_folder
from draftsmith.train.checkpoints import latest_checkpoint, verify

FORMATS = ("hf", "speculators", "sglang")
SERVING_FORMATS = ("speculators", "sglang")   # EAGLE heads for vLLM and SGLang
SERVING_KINDS = {"speculators": ("eagle", "eagle3", "dflash", "dspark"), "sglang": ("eagle", "eagle3")}
BLOCK_KINDS = ("dflash", "dspark")


def _checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    """The checkpoint to export, its files checked against the sha256 in its meta.json."""
    if checkpoint:
        ckpt = Path(checkpoint) if Path(checkpoint).is_dir() else run_dir / "checkpoints" / checkpoint
        why = verify(ckpt)
        if why is not None:
            raise DraftsmithError("This checkpoint cannot be exported", f"{ckpt}: {why}",
                                  "Export another checkpoint (--checkpoint step-N), or the latest usable one")
        return ckpt
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise DraftsmithError("No complete checkpoint in this run folder", str(run_dir),
                              "Train first (draftsmith train <recipe>), or point at a run folder under runs/")
    return ckpt


def _eval_reports(run_dir: Path) -> list[tuple[str, dict]]:
    """The eval reports kept in the run folder (symbolic links are not followed)."""
    found = []
    for folder, _, files in sorted(os.walk(run_dir, followlinks=False)):
        path = Path(folder) / "report.json"
        if "report.json" not in files or path.is_symlink():
            continue
        try:
            found.append((str(path.parent.relative_to(run_dir)), json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return found


def model_card(run_dir: Path, ckpt: Path, config: dict) -> str:
    meta = json.loads((ckpt / "meta.json").read_text())
    metrics = meta.get("metrics", {})
    lines = [
        "---", "library_name: transformers", "tags: [draftsmith, speculative-decoding, drafter]", "---", "",
        f"# Drafter for {config['target']['name']}", "",
        f"A `{config['drafter']['kind']}`{' P-EAGLE (parallel drafting)' if config['drafter'].get('parallel') else ''} "
        "drafter trained by draftsmith for speculative decoding with the target "
        f"`{config['target']['name']}`. It shares the target's tokenizer; decoding with it is lossless (the target "
        "verifies every token).", "",
        "| field | value |", "|---|---|",
        f"| target | `{config['target']['name']}` |",
        f"| recipe | {config.get('description', '')} |",
        f"| data | `{config['data']['source']}` (max_length {config['data']['max_length']}, "
        f"held-out fraction {config['data']['heldout_fraction']}) |",
        f"| loss | `{config['loss']['name']}` (temperature {config['loss']['temperature']}) |",
        f"| steps | {meta['step']} of {config['train']['max_steps']} |",
    ]
    for key in ("heldout_loss", "acceptance_estimate", "greedy_match", "tau_greedy_k4"):
        if key in metrics:
            lines.append(f"| held-out {key} | {metrics[key]:.4f} |")
    for where, report in _eval_reports(run_dir):
        c = report.get("config", {})
        lines.append(f"| τ ({where}: {c.get('bench')}, k={c.get('k')}, T={c.get('temperature')}) | "
                     f"{report.get('tau', float('nan')):.3f} (speedup {report.get('speedup') or float('nan'):.2f}x) |")
    lines += ["", "## Use", "", "```bash",
              f"draftsmith eval --target {config['target']['name']} --drafter <this folder> --bench mt_bench --out eval/",
              "```", ""]
    if config["drafter"]["kind"] == "small_lm":   # a plain transformers LM: transformers' assisted generation takes it
        lines += ["```python", "from transformers import AutoModelForCausalLM",
                  "drafter = AutoModelForCausalLM.from_pretrained('<this folder>')",
                  "out = target.generate(ids, assistant_model=drafter, do_sample=False)", "```", ""]
    lines += ["## Resolved recipe", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def export(run_dir: str | Path, fmt: str, out: str | Path, checkpoint: str | None = None,
           overwrite: bool = False) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise DraftsmithError("Unknown export format", fmt, f"Use one of: {', '.join(FORMATS)}")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file() or config_path.is_symlink():
        raise DraftsmithError("Not a draftsmith run folder (no config.yaml)", str(run_dir))
    protect = [run_dir] + ([Path(checkpoint)] if checkpoint and Path(checkpoint).is_dir() else [])
    check_output_folder(out, overwrite, "export", protect=protect)
    config = yaml.safe_load(config_path.read_text())
    kind = config["drafter"]["kind"]
    if fmt == "sglang" and kind in BLOCK_KINDS:
        raise DraftsmithError("draftsmith writes no SGLang layout for the block drafters: SGLang's DFlash loader "
                              "is a separate pull request, not in a release draftsmith was checked against",
                              f"--format sglang with kind {kind}",
                              "Export it with --format speculators (vLLM's dflash / dspark types) or --format hf "
                              "(draftsmith eval)")
    if fmt in SERVING_FORMATS and kind not in SERVING_KINDS[fmt]:
        raise DraftsmithError(f"--format {fmt} writes EAGLE and block-drafter heads only (speculators: kinds eagle3 "
                              "(P-EAGLE as its peagle type), dflash and dspark; sglang: kinds eagle and eagle3); "
                              "this run trained another kind",
                              kind, "Export it with --format hf: vLLM and SGLang load it as a plain draft model, "
                              "and so do draftsmith eval and transformers' assisted generation")
    ckpt = _checkpoint(run_dir, checkpoint)
    with disk_full_said("the export could not be written", out,
                        "Free some space (or choose an --out on a larger disk), then export again"):
        _write_export(run_dir, ckpt, fmt, out, config)
    return out


def _write_export(run_dir: Path, ckpt: Path, fmt: str, out: Path, config: dict) -> None:
    """The export written into a temporary folder beside `out`, moved into place when whole."""
    from transformers import AutoTokenizer

    kind = config["drafter"]["kind"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        if fmt == "hf":
            if config["drafter"].get("lora"):   # LoRA adapters merged: a plain transformers LM
                merged_from_folder(ckpt / "drafter").save_pretrained(tmp)
            else:
                _copy_regular_files(ckpt / "drafter", tmp)
            strip_target_leftovers(tmp / "config.json")   # a GGUF target's quantization_config, copied by small_lm
            folder, _ = resolve_model_folder(config["target"]["name"])
            AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)   # a drafter shares the target's tokenizer
        else:
            _write_serving(fmt, ckpt, tmp, config)
        (tmp / "README.md").write_text(model_card(run_dir, ckpt, config))
        (tmp / "draftsmith.json").write_text(json.dumps(
            {"kind": kind, "format": fmt, "target": config["target"]["name"], "step": json.loads(
                (ckpt / "meta.json").read_text())["step"], "run": str(run_dir)}, indent=2))
        write_marker(tmp, "export")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_regular_files(src: Path, dst: Path) -> None:
    """Copy the files of a checkpoint's drafter folder; a symbolic link (planted: draftsmith writes none) is
    skipped with a warning, never followed."""
    for f in sorted(src.iterdir()):
        if f.is_symlink() or not f.is_file():
            warnings.warn(f"export skips {f}: not a regular file" + (" (a symbolic link)" if f.is_symlink() else ""))
            continue
        shutil.copyfile(f, dst / f.name, follow_symlinks=False)


def _write_serving(fmt: str, ckpt: Path, out: Path, config: dict) -> None:
    head = read_head_folder(ckpt / "drafter")
    if fmt == "sglang":
        write_sglang(head, out)
        return
    name = config["target"]["name"]
    asset = TARGETS.get(name)
    # eagle3 carries the target's embedding; kind eagle is refused; dflash / dspark leave it to the verifier
    embed = target_embedding(name) if head.config.draftsmith_kind == "eagle3" else None
    write_speculators(head, out, asset.hub_id if asset else name, [asset.architecture if asset else "LlamaForCausalLM"],
                      embed)
