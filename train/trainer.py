"""The training loop on accelerate: AdamW or Muon (train/optim.py), cosine schedule with warm-up, gradient accumulation,
clipping, mixed precision, held-out evaluation, atomic checkpoints and exact resume.

Run folder: runs/<name>/ with config.yaml (resolved recipe), metrics.jsonl, tb/ (TensorBoard),
checkpoints/step-XXXXXXX/{drafter/, state/, meta.json} (plus accelerate/ under DeepSpeed or FSDP,
whose engines write their sharded optimizer state). meta.json lists every file with its size and
sha256 (train/checkpoints.py); the training state holds no pickle (train/state.py).
SIGTERM (a scheduler's preemption, `timeout`) ends the run after the current step with a checkpoint
that `--resume` continues from.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import resource
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from draftsmith.distill.objective import Objective
from draftsmith.errors import DraftsmithError
from draftsmith.folders import disk_full_error
from draftsmith.models.lora import count_parameters
from draftsmith.models.target import native_bf16
from draftsmith.train import state as training_state
from draftsmith.train.checkpoints import file_digests, is_complete, list_checkpoints, read_meta, remove_checkpoint
from draftsmith.train.data import BatchSchedule, collate
from draftsmith.train.optim import build_optimizer
from draftsmith.train.steps import forward_batch, heldout_metrics
from draftsmith.train.weights import load_drafter_weights


def peak_rss_gib() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@functools.lru_cache(maxsize=1)
def _glibc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):    # not glibc (musl, macOS): nothing to trim
        return None


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim). A CPU training step frees GBs of
    activations of sizes that change with every batch; glibc keeps them, fragmented, and the process's
    resident memory grew by ~4 MiB a step on eagle3-ttt-quick (2.6 GiB after 10 steps, 5.2 GiB after 600)
    with a constant 0.37 GiB of live tensors (bench/results/cpu-train-memory). The pages come back as
    faults on the next step: `train.trim_heap_every` spaces the calls."""
    trim = _glibc_trim()
    if trim is not None:
        trim(0)


class TrainingDiverged(DraftsmithError):
    pass


def resolve_mixed_precision(name: str, device: str) -> str:
    """`auto`: bf16 on CUDA with bf16 support; on CPU bf16 autocast where oneDNN has bf16 kernels
    (AMX/AVX512-BF16 make it ~3x faster than fp32 there); otherwise full precision."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if native_bf16(device) else "no"


def cosine_with_warmup(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class Trainer:
    def __init__(self, cfg, run_dir: Path, accelerator, target, drafter, train_rows, heldout_rows):
        self.cfg, self.run_dir, self.acc = cfg, run_dir, accelerator
        self.target, self.train_rows, self.heldout_rows = target, train_rows, heldout_rows
        self.tokenizer = target.tokenizer
        t = cfg.train
        self.objective = Objective.from_config(cfg.loss)
        optimizer = build_optimizer(drafter, t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(t.warmup_steps, t.max_steps, t.min_lr_ratio))
        self.drafter, self.optimizer = accelerator.prepare(drafter, optimizer)   # the kind's train module
        # stepped by hand once per optimizer step (a prepared scheduler steps once per process); saved as
        # JSON by train/state.py, not registered with accelerate (which would pickle it)
        # DeepSpeed and FSDP shard the optimizer state: their engines save it (accelerate/ in a checkpoint)
        self.sharded = accelerator.distributed_type.value in ("DEEPSPEED", "FSDP")
        self.schedule = BatchSchedule(len(train_rows), t.batch_size, accelerator.num_processes,
                                      accelerator.process_index, t.seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.pad = pad
        n_heldout = min(len(heldout_rows), cfg.eval.batches * t.batch_size)
        self.heldout_batches = [
            self._to_device(collate([heldout_rows[j] for j in range(i, min(i + t.batch_size, n_heldout))], pad))
            for i in range(0, n_heldout, t.batch_size)]
        self.step = 0
        self.micro_step = 0
        self.tb = None

    # -------------------------------------------------------------------------------- helpers
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def _batch(self, micro_step: int) -> dict:
        rows = [self.train_rows[i] for i in self.schedule.indices(micro_step)]
        return self._to_device(collate(rows, self.pad))

    def log(self, metrics: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, self.step)
            self.tb.flush()

    def evaluate(self) -> dict:
        if self.acc.device.type == "cpu" and self.cfg.train.trim_heap_every:
            release_free_heap()     # the held-out pass allocates on top of what training left free
        self.drafter.eval()
        with self.acc.autocast():
            metrics = heldout_metrics(self.target.model, self.drafter, self.heldout_batches, self.objective,
                                      self.cfg.eval.k_max)
        self.drafter.train()
        return metrics

    # ----------------------------------------------------------------------------- checkpoints
    def save(self, metrics: dict | None = None) -> Path:
        ckpts = self.run_dir / "checkpoints"
        final = ckpts / f"step-{self.step:07d}"
        tmp = ckpts / f".tmp-step-{self.step:07d}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        weights = self.acc.get_state_dict(self.drafter)    # gathers shards under ZeRO-3 / FSDP: every process
        failure = None
        try:
            if self.sharded:
                self.acc.save_state(str(tmp / "accelerate"))
            training_state.save_state(tmp / "state", self.optimizer, self.scheduler, self.acc,
                                      with_optimizer=not self.sharded)
            if self.acc.is_main_process:
                model = self.acc.unwrap_model(self.drafter).model
                model.save_pretrained(tmp / "drafter", state_dict={k.removeprefix("model."): v for k, v in weights.items()})
        except OSError as err:
            failure = err
        # every process has written its part (its random states) before rank 0 lists the files
        self._agree_on_failure(failure, tmp)
        if self.acc.is_main_process:
            try:
                files, digests = file_digests(tmp)
                meta = {"format": training_state.FORMAT, "step": self.step, "micro_step": self.micro_step,
                        "metrics": metrics or {}, "time": time.time(), "files": files, "sha256": digests}
                training_state.write_json(meta, tmp / "meta.json")
                if final.exists():
                    remove_checkpoint(final)
                tmp.rename(final)
                complete = [c for c in list_checkpoints(self.run_dir) if is_complete(c)]
                for old in complete[: -self.cfg.checkpoint.keep]:
                    remove_checkpoint(old)
            except OSError as err:
                failure = err
        self._agree_on_failure(failure, tmp)
        return final

    def _agree_on_failure(self, failure: OSError | None, tmp: Path) -> None:
        """Every process raises when one failed to write (the others would wait at the next barrier
        forever); the half-written folder goes. A full disk is said in words."""
        failed = failure is not None
        if self.acc.num_processes > 1:
            flag = torch.tensor(float(failed), device=self.acc.device)
            failed = bool(self.acc.reduce(flag, reduction="sum").item() > 0)
        if not failed:
            return
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            said = disk_full_error(failure, f"checkpoint step {self.step} could not be saved", tmp,
                                   "Free some space (or set run.out_dir on a larger disk), then continue with --resume "
                                   "from the last checkpoint")
            if said is not None:
                raise said from None
            raise failure
        raise DraftsmithError(f"Another process failed to write its part of checkpoint step {self.step}", str(tmp),
                              "Its error is printed above; fix it, then continue with --resume")

    def load(self, ckpt: Path) -> None:
        """Resume from `ckpt` (checked by train/checkpoints.py): weights, optimizer, scheduler, RNGs, step."""
        meta = read_meta(ckpt)
        try:
            if not self.sharded:   # the engines of DeepSpeed and FSDP load their own (sharded) weights
                load_drafter_weights(self.acc.unwrap_model(self.drafter).model, ckpt / "drafter")
            if self.sharded:
                training_state.check_engine_pickles(ckpt / "accelerate")
                with training_state.weights_only_loads():
                    self.acc.load_state(str(ckpt / "accelerate"))
            if meta.get("format") == training_state.FORMAT:
                training_state.load_state(ckpt / "state", self.optimizer, self.scheduler, self.acc)
            else:
                training_state.load_legacy_state(ckpt / "accelerate", self.optimizer, self.scheduler, self.acc,
                                                 with_optimizer=not self.sharded)
        except DraftsmithError:
            raise
        except Exception as err:   # a damaged or crafted file: say which checkpoint, not a traceback
            raise DraftsmithError("This checkpoint's training state could not be loaded", f"{ckpt}: "
                                  f"{type(err).__name__}: {str(err)[:300]}",
                                  "Delete this checkpoint folder to resume from an earlier one, or start again "
                                  "with --overwrite") from None
        self.step, self.micro_step = meta["step"], meta["micro_step"]

    # ------------------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg, acc, t = self.cfg, self.acc, self.cfg.train
        if acc.is_main_process and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        start = time.time()
        deadline = start + t.max_minutes * 60 if t.max_minutes else None
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", disable=not acc.is_main_process)
        if acc.is_main_process:   # the budget is a token count; the bar's ETA says when it will be spent
            sequences = t.batch_size * t.grad_accum * acc.num_processes
            tqdm.write(f"[draftsmith] budget: {t.max_steps} steps x {sequences} sequences x <= {cfg.data.max_length} "
                       f"tokens (<= {t.max_steps * sequences * cfg.data.max_length:,} tokens)"
                       + (f", or {t.max_minutes} minutes" if t.max_minutes else ""))
            tqdm.write(f"[draftsmith] objective: {self.objective.describe()}, optimizer {t.optimizer}")
        self.drafter.train()
        stop = _StopOnSigterm()
        with stop:
            metrics, tokens_seen = self._loop(bar, stop, deadline)
        saved = list_checkpoints(self.run_dir)
        if not stop.requested and (not saved or saved[-1].name != f"step-{self.step:07d}"):
            # max_steps=0 (or a resumed run already at max_steps) still ends with an evaluated checkpoint
            metrics = self.evaluate()
            self.log(metrics)
            self.save(metrics)
        bar.close()
        if self.tb is not None:
            self.tb.close()
        summary = {"step": self.step, "minutes": (time.time() - start) / 60, "tokens": tokens_seen, **metrics}
        trainable, total = count_parameters(self.drafter)
        summary["drafter_params"] = {"trainable": trainable, "frozen": total - trainable}
        if acc.device.type == "cuda":
            summary["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        summary["peak_rss_gib"] = peak_rss_gib()   # the whole process: target, data, drafter, optimizer
        if stop.requested:
            # not finished: no summary.json (what marks a finished run), a line in metrics.jsonl instead
            summary["stopped"] = "SIGTERM"
            self.log({"stopped": "SIGTERM"})
        elif acc.is_main_process:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _loop(self, bar, stop: _StopOnSigterm, deadline: float | None) -> tuple[dict, int]:
        """Steps until max_steps, the deadline or SIGTERM; returns the last held-out metrics and the
        tokens seen."""
        cfg, acc, t = self.cfg, self.acc, self.cfg.train
        tokens_seen, window_start, window_tokens, loss_sum, loss_n = 0, time.time(), 0, 0.0, 0
        stats: dict[str, list[float]] = {}      # the window's alpha per draft position and implied tau
        metrics: dict = {}
        while self.step < t.max_steps:
            for _ in range(t.grad_accum):
                batch = self._batch(self.micro_step)
                self.micro_step += 1
                with acc.accumulate(self.drafter), acc.autocast():
                    loss, _, _ = forward_batch(self.target.model, self.drafter, batch, self.objective)
                    if not torch.isfinite(acc.reduce(loss.detach(), reduction="mean")):
                        raise self._diverged(float(loss.detach()))
                    acc.backward(loss)
                    if acc.sync_gradients and t.max_grad_norm:
                        acc.clip_grad_norm_(self.drafter.parameters(), t.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                n_tok = int(batch["attention_mask"].sum()) * acc.num_processes
                tokens_seen += n_tok
                window_tokens += n_tok
                loss_sum += float(loss.detach())
                loss_n += 1
                for key, value in getattr(acc.unwrap_model(self.drafter), "train_stats", {}).items():
                    stats.setdefault(key, []).append(value)
            self.scheduler.step()
            self.step += 1
            if acc.device.type == "cpu" and t.trim_heap_every and self.step % t.trim_heap_every == 0:
                release_free_heap()
            bar.update()
            if self.step % cfg.log.every == 0 or self.step == t.max_steps:
                rate = window_tokens / max(1e-9, time.time() - window_start)
                means = {key: sum(v) / len(v) for key, v in stats.items()}
                self.log({"loss": loss_sum / loss_n, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": rate,
                          "tokens": tokens_seen, "epoch": self.schedule.epoch_of(self.micro_step), **means})
                alphas = "/".join(f"{means[f'alpha_pos{i}']:.2f}" for i in range(len(means)) if f"alpha_pos{i}" in means)
                shown = {"alpha": alphas, "tau": f"{means['tau_implied']:.2f}"} if alphas else {}
                bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", tok_s=f"{rate:.0f}", **shown)
                window_start, window_tokens, loss_sum, loss_n, stats = time.time(), 0, 0.0, 0, {}
            out_of_time = deadline is not None and time.time() > deadline
            stopping = stop.check(acc)
            if (self.step % cfg.eval.every == 0 or self.step == t.max_steps or out_of_time) and not stopping:
                metrics = self.evaluate()
                self.log(metrics)
                if acc.is_main_process and metrics:
                    tqdm.write(f"step {self.step}: heldout_loss {metrics['heldout_loss']:.4f} "
                               f"acceptance {metrics['acceptance_estimate']:.3f} greedy_match {metrics['greedy_match']:.3f} "
                               f"tau_greedy_k4 {metrics.get('tau_greedy_k4', float('nan')):.2f}")
            if self.step % cfg.checkpoint.every == 0 or self.step == t.max_steps or out_of_time or stopping:
                self.save(metrics)
            if out_of_time or stopping:
                if acc.is_main_process:
                    why = "SIGTERM received" if stopping else f"train.max_minutes={t.max_minutes} reached"
                    tqdm.write(f"{why} at step {self.step}; checkpoint saved (continue with --resume)")
                break
        return metrics, tokens_seen


    def _diverged(self, value: float) -> TrainingDiverged:
        saved = [c for c in list_checkpoints(self.run_dir) if is_complete(c)]
        kept = (f"the last good checkpoint ({saved[-1].name}) is kept" if saved else
                "no checkpoint was saved before it")
        fix = ("Lower train.lr or use mixed_precision=no, then --resume" if saved else
               "Lower train.lr or use mixed_precision=no, then train again with --overwrite")
        return TrainingDiverged(f"The loss became {value} at step {self.step + 1}; {kept}", str(self.run_dir), fix)


class _StopOnSigterm:
    """While active, SIGTERM sets a flag instead of killing the process; the loop checks it after each
    step (all ranks agree through one all-reduce when several processes train)."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, acc) -> bool:
        if acc.num_processes > 1:
            flag = torch.tensor(float(self.requested), device=acc.device)
            self.requested = bool(acc.reduce(flag, reduction="sum").item() > 0)
        return self.requested
