"""`draftsmith train`: recipe -> run folder. Works as one process or under `accelerate launch`."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs,
                              broadcast_object_list, set_seed)

from draftsmith.distill.objective import Objective
from draftsmith.distill.teacher import attach_cache, cached_feature_scale, keep_shared_parts, teacher_cache_dir
from draftsmith.errors import DraftsmithError
from draftsmith.folders import check_output_folder, marker_kind, write_marker
from draftsmith.models.block_drafter import BlockHead, BlockTrainModule, build_block_head
from draftsmith.models.dflash import DFlashHead
from draftsmith.models.draft_vocab import draft_vocab_from_counts
from draftsmith.models.dspark import DSparkHead
from draftsmith.models.eagle import EagleTrainModule, build_eagle, feature_scale
from draftsmith.models.eagle3 import Eagle3TrainModule, build_eagle3
from draftsmith.models.layers import default_aux_layers, target_parts
from draftsmith.models.formats import read_head_folder
from draftsmith.models.lora import adapted_target, apply_lora
from draftsmith.models.parallel import build_parallel
from draftsmith.models.parallel_train import ParallelTrainModule
from draftsmith.models.peagle import PEagleHead, PEagleTrainModule
from draftsmith.models.mask_token import choose_mask_token
from draftsmith.models.small_lm import SmallLMTrainModule, build_small_lm
from draftsmith.models.target import load_target, resolve_dtype
from draftsmith.train.checkpoints import clean_stale, list_checkpoints, resume_checkpoint
from draftsmith.train.config import changed_settings, load_recipe, resolve_recipe_path, save_resolved
from draftsmith.train.data import collate
from draftsmith.train.lock import LOCK_NAME, RunLock
from draftsmith.train.rows import load_data
from draftsmith.train.trainer import Trainer, resolve_mixed_precision


def make_accelerator(cfg):
    cuda = torch.cuda.is_available()
    precision = resolve_mixed_precision(cfg.train.mixed_precision, "cuda" if cuda else "cpu")
    # multi-process on CPU needs gloo (NCCL is CUDA-only)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if multi and not cuda else []
    if not cuda and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # accelerate keeps DeepSpeed for accelerator devices: on CPU it would train plain DDP, ZeRO ignored
        raise DraftsmithError("DeepSpeed through accelerate does not run on CPU processes: they would train as plain DDP and "
                              "ignore the ZeRO settings", "an accelerate launch with a DeepSpeed config, no CUDA device",
                              "On CPU launch with recipes/accelerate/fsdp.yaml (FSDP2 over gloo shards weights, "
                              "gradients and optimizer state) or ddp.yaml; DeepSpeed ZeRO needs GPUs")
    fsdp_on_cpu = multi and not cuda and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_on_cpu and os.environ.get("FSDP_VERSION", "1") != "2":
        raise DraftsmithError("FSDP on CPU processes needs FSDP2 (FSDP1 wants a device per process)",
                              f"fsdp_version {os.environ.get('FSDP_VERSION', '1')}",
                              "Set fsdp_version: 2 in the accelerate config (as recipes/accelerate/fsdp.yaml does)")
    # cpu=True: without it a CPU-only multi-process launch runs as DistributedType.NO and never
    # syncs gradients
    acc = Accelerator(cpu=not cuda, gradient_accumulation_steps=cfg.train.grad_accum, mixed_precision=precision,
                      kwargs_handlers=handlers)
    if fsdp_on_cpu:
        use_fsdp_on_cpu(acc)
    return acc


def use_fsdp_on_cpu(acc) -> None:
    """An FSDP launch (`accelerate launch` with an FSDP config) on CPU processes: accelerate 1.16 runs a CPU
    launch as MULTI_CPU (plain DDP) and drops the FSDP plugin, although torch's FSDP2 (`fully_shard`) and its
    distributed checkpoint run over gloo. Set the state as accelerate does for GPUs (AcceleratorState.__init__),
    so that prepare, get_state_dict and save_state / load_state take their FSDP2 paths."""
    plugin = FullyShardedDataParallelPlugin()     # the launch's FSDP_* settings, read as Accelerator reads them
    if acc.state.mixed_precision != "no":
        plugin.set_mixed_precision(acc.state.mixed_precision)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def run_folder(cfg) -> Path:
    """`run.out_dir/run.name`, refused unless the name is one plain folder name inside out_dir."""
    name, out_dir = cfg.run.name, Path(cfg.run.out_dir)
    plain = (isinstance(name, str) and name.strip() == name and name not in ("", ".", "..")
             and not any(sep in name for sep in ("/", "\\", "\0")) and Path(name).name == name)
    if not plain:
        raise DraftsmithError("run.name must be one plain folder name", name,
                              "Use letters, digits, '-', '_' or '.', without slashes; not '.' or '..'")
    if out_dir.exists() and not out_dir.is_dir():
        raise DraftsmithError("run.out_dir is a file, not a folder", str(out_dir),
                              "Set run.out_dir to a folder (default: runs)")
    run_dir = out_dir / name
    if out_dir.resolve() != run_dir.resolve().parent:
        raise DraftsmithError("The run folder resolves outside run.out_dir (a symbolic link?)",
                              f"{run_dir} -> {run_dir.resolve()}", "Use another run.name")
    if run_dir.exists() and not run_dir.is_dir():
        raise DraftsmithError("The run folder is a file", str(run_dir), "Use another run.name")
    return run_dir


def open_run_dir(run_dir: Path, resume: bool, overwrite: bool, lock) -> Path | None:
    """On the main process: check the run folder against --resume / --overwrite, create it (with its
    marker), lock it, empty it for --overwrite, remove what interrupted saves left, and return the
    checkpoint to resume from."""
    if resume and overwrite:
        raise DraftsmithError("--resume and --overwrite contradict each other", "both given",
                              "Pass --resume to continue the run, or --overwrite to start it again")
    if resume and not run_dir.is_dir():
        raise DraftsmithError("--resume found no run folder to continue", str(run_dir),
                              "Train without --resume to start the run, or check run.name / run.out_dir")
    if resume and marker_kind(run_dir) != "run" and not (run_dir / "config.yaml").is_file():
        raise DraftsmithError("--resume: this folder is not a draftsmith run (no marker, no config.yaml)",
                              str(run_dir), "Check run.name / run.out_dir")
    if list_checkpoints(run_dir) and not (resume or overwrite):
        raise DraftsmithError("The run folder already holds checkpoints", str(run_dir),
                              "Pass --resume to continue it, --overwrite to start again, or set run.name=...")
    if overwrite:
        check_output_folder(run_dir, True, "run", option="the run folder", other="Set another run.name")
    elif not resume and run_dir.is_dir() and any(run_dir.iterdir()) and marker_kind(run_dir) != "run":
        raise DraftsmithError("The run folder exists, is not empty and is not a draftsmith run", str(run_dir),
                              "Set run.name (or run.out_dir) to a new or empty folder")
    fresh = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        write_marker(run_dir, "run")
    lock.acquire()
    if overwrite:   # the lock file stays: another process must not slip in while the folder is emptied
        for entry in run_dir.iterdir():
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    removed = clean_stale(run_dir)
    if removed:
        print(f"[draftsmith] removed what interrupted saves left in {run_dir / 'checkpoints'}: "
              f"{', '.join(removed)}", flush=True)
    ckpt = resume_checkpoint(run_dir) if resume else None
    if marker_kind(run_dir) != "run":   # an empty folder, or a run from before markers that resumes
        write_marker(run_dir, "run")
    return ckpt


def on_main(acc, fn):
    """fn() on the main process; every process returns its result or raises its DraftsmithError (a
    process that raised alone would leave the others waiting at the next barrier)."""
    result, error = None, None
    if acc.is_main_process:
        try:
            result = fn()
        except DraftsmithError as err:
            error = str(err)
        except Exception as err:
            error = f"the main process failed: {type(err).__name__}: {err}"
            if acc.num_processes == 1:
                raise
    if acc.num_processes > 1:
        box = [result, error]
        broadcast_object_list(box)
        result, error = box
    if error is not None:
        raise DraftsmithError(error)
    return result


def build_drafter(cfg, target_model, train_rows, pad_id: int, dry: bool = False, tokenizer=None):
    """The training module of the recipe's drafter kind (what accelerate wraps). dry: on the meta
    device, without data (feature scale 1, the draft vocabulary the first ids). `tokenizer` names
    P-EAGLE's default mask token (models/mask_token.py)."""
    d = cfg.drafter
    torch.manual_seed(cfg.train.seed)
    if d.kind == "parallel":
        if d.freeze_embeddings and cfg.train.weight_decay:
            raise DraftsmithError("drafter.freeze_embeddings keeps rows frozen by a zero gradient, which "
                                  "weight decay would still shrink", cfg.train.weight_decay,
                                  "Set train.weight_decay=0 or drafter.freeze_embeddings=false")
        drafter = build_parallel(target_model, d, dry).float()   # fp32 master weights; autocast computes in bf16
        if d.lora is not None:
            apply_lora(drafter, d.lora)    # frozen base; the mask row trains through peft's trainable tokens
        return ParallelTrainModule(drafter, Objective.from_config(cfg.loss), d.parallel_k, d.cod_ratio, d.cod_floor,
                                   d.freeze_embeddings and d.lora is None)
    if d.kind in ("dflash", "dspark"):
        head = warm_start(d, target_model) if d.init_from is not None and not dry else \
            build_block(d, target_model, train_rows, tokenizer, dry)
        return BlockTrainModule(head, target_model, Objective.from_config(cfg.loss), d.max_anchors,
                                cfg.loss.confidence_weight)
    if d.init_from is not None and not dry:
        head = warm_start(d, target_model)
        if d.parallel:
            head = as_peagle(d, head, target_model, train_rows, tokenizer)
        return _train_module(d, cfg.loss, head, target_model)
    if d.kind == "small_lm":
        drafter = build_small_lm(target_model, d.num_layers, d.hidden_size, d.intermediate_size, d.init,
                                 d.layers_from_target)
        if d.lora is not None:
            return SmallLMTrainModule(apply_lora(drafter.float(), d.lora))   # only the adapters train
        if d.freeze_embeddings:
            drafter.get_input_embeddings().requires_grad_(False)
            drafter.get_output_embeddings().requires_grad_(False)
        return SmallLMTrainModule(drafter.float())   # fp32 master weights; autocast computes in bf16
    if d.kind == "eagle":
        scale = 1.0
        if not dry:
            sample = collate([train_rows[i] for i in range(min(8, len(train_rows)))], pad_id)
            if "teacher" in sample:     # an offline teacher cache: the target's layers do not run
                scale = cached_feature_scale(target_model, sample)
            else:
                device = next(target_model.parameters()).device
                scale = feature_scale(target_model, sample["input_ids"].to(device), sample["attention_mask"].to(device))
        return _train_module(d, cfg.loss, build_eagle(target_model, scale).float(), target_model)
    if d.kind == "eagle3":
        n_layers = target_model.config.num_hidden_layers
        vocab = target_model.config.vocab_size
        size = d.draft_vocab_size or vocab // 4
        draft_ids = torch.arange(size) if dry else draft_vocab(train_rows, vocab, size)
        head = build_eagle3(target_model, d.aux_layers or default_aux_layers(n_layers), draft_ids, d.init).float()
        if d.parallel:
            head = as_peagle(d, head, target_model, train_rows, tokenizer)
        return _train_module(d, cfg.loss, head, target_model)
    raise DraftsmithError("draftsmith train cannot build this drafter kind yet", d.kind,
                          "Use small_lm, eagle, eagle3 or parallel")


def _train_module(d, loss_cfg, head, target_model):
    """The training module of an EAGLE-style head (what accelerate wraps)."""
    if d.kind == "eagle":
        return EagleTrainModule(head, target_model, loss_cfg.feature_weight, d.feature_noise)
    if d.parallel:
        return PEagleTrainModule(head, target_model, d.cod_ratio, d.cod_floor, Objective.from_config(loss_cfg))
    return Eagle3TrainModule(head, target_model, d.ttt_steps, d.ttt_decay, Objective.from_config(loss_cfg))


def build_block(d, target_model, train_rows, tokenizer, dry: bool) -> BlockHead:
    """A fresh dflash / dspark head (models/block_drafter.py): tapped layers as eagle3's unless given, the
    draft vocabulary from the training data, the mask token by models/mask_token.py."""
    n_layers = target_model.config.num_hidden_layers
    vocab = target_model.config.vocab_size
    size = d.draft_vocab_size or vocab // 4
    draft_ids = torch.arange(size) if dry else draft_vocab(train_rows, vocab, size)
    mask_id = choose_mask_token(vocab, None if dry else train_rows, tokenizer, d.mask_token_id)
    if train_rows is not None and not dry:
        name = tokenizer.convert_ids_to_tokens(mask_id) if tokenizer is not None else "?"
        print(f"[draftsmith] {d.kind} mask token: id {mask_id} ({name!r})", flush=True)
    extra = {}
    if d.kind == "dspark":
        extra = {"markov_rank": 256 if d.markov_rank is None else d.markov_rank,
                 "confidence_head": d.confidence_head is not False}
    cls = DSparkHead if d.kind == "dspark" else DFlashHead
    head = build_block_head(cls, target_model, d.aux_layers or default_aux_layers(n_layers), draft_ids, mask_id,
                            d.num_layers, d.block_size, d.init, d.layers_from_target, **extra)
    return head.float()


def as_peagle(d, head, target_model, train_rows, tokenizer):
    """The P-EAGLE head of an `eagle3` recipe with `parallel: true`: a fresh or warm-started EAGLE-3 head
    gains the mask parameters (mask token: models/mask_token.py); a P-EAGLE warm start
    keeps its mask token and trains the recipe's depths."""
    if isinstance(head, PEagleHead):
        if d.mask_token_id is not None and d.mask_token_id != head.config.mask_token_id:
            raise DraftsmithError("drafter.mask_token_id differs from the warm-start head's mask token",
                                  f"recipe {d.mask_token_id}, head {head.config.mask_token_id}",
                                  "Set drafter.mask_token_id=null (the head keeps its own), or start a new head")
        head.config.parallel_k = d.parallel_k
        return head
    mask_id = choose_mask_token(head.config.vocab_size, train_rows, tokenizer, d.mask_token_id)
    if train_rows is not None:
        name = tokenizer.convert_ids_to_tokens(mask_id) if tokenizer is not None else "?"
        print(f"[draftsmith] P-EAGLE mask token: id {mask_id} ({name!r})", flush=True)
    return PEagleHead.from_eagle3(head, target_parts(target_model)[0], d.parallel_k, mask_id)


def warm_start(d, target_model):
    """A trained head (`drafter.init_from`) in fp32 for further training, checked against the recipe's
    kind and the target's shape; its own layout (layers read, draft vocabulary) is kept."""
    folder = Path(d.init_from)
    if not (folder / "config.json").is_file():
        raise DraftsmithError("drafter.init_from is not a drafter folder (no config.json)", str(folder),
                              "Point at a folder written by draftsmith export, or a run's checkpoints/step-N/drafter")
    head = read_head_folder(folder, target_model.config.num_hidden_layers)
    kind = getattr(getattr(head, "config", None), "draftsmith_kind", None)
    if getattr(getattr(head, "config", None), "parallel", False) and not d.parallel:
        raise DraftsmithError("drafter.init_from holds a P-EAGLE head (parallel drafting)", str(folder),
                              "Set drafter.parallel=true to train it further")
    if kind != d.kind:
        raise DraftsmithError("drafter.init_from holds another kind of drafter than the recipe's",
                              f"{folder}: {kind or 'not an EAGLE head'}, recipe: {d.kind}",
                              f"Set drafter.kind={kind}, or point at a {d.kind} head" if kind else
                              f"Point at a {d.kind} head")
    c, t = head.config, target_model.config
    mine = (getattr(c, "target_hidden_size", c.hidden_size), c.vocab_size)
    if mine != (t.hidden_size, t.vocab_size):
        raise DraftsmithError("drafter.init_from was trained for another target",
                              f"head (hidden, vocabulary) {mine}, target {(t.hidden_size, t.vocab_size)}",
                              "Warm-start from a head trained for this target")
    print(f"[draftsmith] warm start from {folder}", flush=True)
    return head.float().to(next(target_model.parameters()).device)


def draft_vocab(train_rows, vocab_size: int, size: int):
    """EAGLE-3's reduced vocabulary: the `size` most frequent assistant tokens of the training data."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for row in train_rows:
        ids = torch.as_tensor(row["input_ids"])
        counts += torch.bincount(ids[torch.as_tensor(row["loss_mask"], dtype=torch.bool)], minlength=vocab_size)[:vocab_size]
    ids = draft_vocab_from_counts(counts, size)
    covered = float(counts[ids].sum()) / max(1, int(counts.sum()))
    print(f"[draftsmith] draft vocabulary: {size} of {vocab_size} tokens cover {covered:.1%} of the "
          f"{int(counts.sum())} assistant tokens in the training data", flush=True)
    return ids


def train(recipe: str, overrides: list[str] = (), resume: bool = False, overwrite: bool = False) -> dict:
    path = resolve_recipe_path(recipe)
    cfg = load_recipe(path, overrides)
    if cfg.run.name is None:
        cfg.run.name = path.stem
    run_dir = run_folder(cfg)
    acc = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    # one process trains into a run folder: the main process holds the lock until training ends
    lock = RunLock(run_dir)
    try:
        ckpt = on_main(acc, lambda: open_run_dir(run_dir, resume, overwrite, lock))
        return _train(cfg, acc, run_dir, ckpt)
    finally:
        lock.release()


def keep_changed_config(cfg, run_dir: Path, step: int) -> None:
    """A resume whose settings differ from the run's says which (old -> new), keeps the run's config.yaml as
    config-until-step-N.yaml and its new settings in metrics.jsonl, then writes the resolved config."""
    changes = changed_settings(run_dir, cfg)
    if changes:
        kept = run_dir / f"config-until-step-{step:07d}.yaml"
        if not kept.exists():
            shutil.copyfile(run_dir / "config.yaml", kept)
        lines = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
        print(f"[draftsmith] resuming at step {step} with changed settings (the run's earlier config is kept as "
              f"{kept.name}):\n{lines}", file=sys.stderr, flush=True)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "resumed_with_changes": {k: list(v) for k, v in changes.items()}},
                               default=str) + "\n")
    save_resolved(cfg, run_dir)


def training_target_dtype(dtype: str, acc) -> torch.dtype:
    """The frozen target's weights while training. `auto` under bf16 autocast holds them in bf16 on every
    device: autocast runs the target's matmuls in bf16 anyway, so only the residual stream and norms lose
    precision (as SpecForge's SGLang capture does), and the process holds 2 bytes per target weight instead of
    4 (SmolLM2: -0.27 GiB) and skips a weight cast per matmul (bench/results/cpu-train-memory). Decoding
    (`draftsmith eval`) keeps its own `auto` (fp32 on CPU, where greedy equality is checked exactly)."""
    if dtype in (None, "auto") and acc.state.mixed_precision == "bf16":
        return torch.bfloat16
    return resolve_dtype(dtype, str(acc.device))


def _train(cfg, acc, run_dir: Path, ckpt: Path | None) -> dict:
    if acc.is_main_process and ckpt is None:
        save_resolved(cfg, run_dir)
    cached = teacher_cache_dir(cfg.data.teacher)
    # with a teacher cache the target's layers never reach the training device (distill/teacher.py)
    target = load_target(cfg.target.name, training_target_dtype(cfg.target.dtype, acc),
                         device="cpu" if cached else str(acc.device))
    if cfg.target.adapter is not None:
        target = adapted_target(target, cfg.target.adapter)
    with acc.main_process_first():
        train_rows, heldout_rows = load_data(cfg, target.tokenizer)
    if cached:
        train_rows, heldout_rows = attach_cache(cached, cfg, target, train_rows, heldout_rows)
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0
    drafter = build_drafter(cfg, target.model, train_rows, pad, tokenizer=target.tokenizer)
    if cached:
        keep_shared_parts(target, acc.device)
    trainer = Trainer(cfg, run_dir, acc, target, drafter, train_rows, heldout_rows)
    if ckpt is not None:
        trainer.load(Path(ckpt))
        if acc.is_main_process:   # only now: a refused resume leaves the run's config.yaml as it was
            keep_changed_config(cfg, run_dir, trainer.step)
            print(f"[draftsmith] resumed from {ckpt} (step {trainer.step})", flush=True)
    summary = trainer.fit()
    if acc.is_main_process:
        parts = [f"step {summary['step']}", f"{summary['minutes']:.1f} min", f"{summary['tokens']} tokens"]
        if "greedy_match" in summary:
            parts += [f"heldout_loss {summary['heldout_loss']:.4f}", f"greedy_match {summary['greedy_match']:.3f}",
                      f"predicted tau(k=4) {summary['tau_greedy_k4']:.2f}"]
        params = summary["drafter_params"]
        parts.append(f"{params['trainable'] / 1e6:.2f}M trainable / {params['frozen'] / 1e6:.2f}M frozen drafter params")
        if "peak_gpu_memory_gib" in summary:
            parts.append(f"peak GPU memory {summary['peak_gpu_memory_gib']:.1f} GiB")
        parts.append(f"peak RSS {summary['peak_rss_gib']:.2f} GiB")
        print(f"[draftsmith] done: {run_dir} | " + " | ".join(parts), flush=True)
    acc.end_training()
    if acc.distributed_type == DistributedType.FSDP and acc.device.type == "cpu":
        # a gloo worker thread frees the tensors of the last collectives it ran, which takes the GIL; under
        # FSDP (whose device mesh keeps the group alive past destroy_process_group) it can still be waiting
        # for the GIL when the interpreter shuts down, and then aborts the process ("terminate called without
        # an active exception", about one exit in ten here): let it have the GIL first
        time.sleep(0.2)
    return summary
