"""The training loop on accelerate: AdamW, cosine schedule with warm-up, gradient accumulation,
clipping, mixed precision, held-out evaluation, atomic checkpoints and exact resume.

Run folder: runs/<name>/ with config.yaml (resolved recipe), metrics.jsonl, tb/ (TensorBoard),
checkpoints/step-XXXXXXX/{accelerate/, drafter/, meta.json}. A checkpoint is complete only when
its meta.json lists every file with its size; anything else is skipped with a warning.
SIGTERM (a scheduler's preemption, `timeout`) ends the run after the current step with a checkpoint
that `--resume` continues from.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from draftsmith.errors import DraftsmithError
from draftsmith.train.data import BatchSchedule, collate
from draftsmith.train.steps import forward_batch, heldout_metrics


class TrainingDiverged(DraftsmithError):
    pass


def resolve_mixed_precision(name: str, device: str) -> str:
    """`auto`: bf16 on CUDA with bf16 support; on CPU bf16 autocast where oneDNN has bf16 kernels
    (AMX/AVX512-BF16 make it ~3x faster than fp32 there); otherwise full precision."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    except (AttributeError, RuntimeError):
        return "no"


def cosine_with_warmup(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ------------------------------------------------------------------------------------ checkpoints

def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))


def is_complete(ckpt: Path) -> bool:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        return all((ckpt / rel).stat().st_size == size for rel, size in meta["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def latest_checkpoint(run_dir: Path) -> Path | None:
    for ckpt in reversed(list_checkpoints(run_dir)):
        if is_complete(ckpt):
            return ckpt
        warnings.warn(f"skipping incomplete or corrupt checkpoint {ckpt} (its meta.json does not match its files)")
    return None


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


class Trainer:
    def __init__(self, cfg, run_dir: Path, accelerator, target, drafter, train_rows, heldout_rows):
        self.cfg, self.run_dir, self.acc = cfg, run_dir, accelerator
        self.target, self.train_rows, self.heldout_rows = target, train_rows, heldout_rows
        self.tokenizer = target.tokenizer
        t = cfg.train
        decay, no_decay = [], []
        for name, p in drafter.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(t.warmup_steps, t.max_steps, t.min_lr_ratio))
        self.drafter, self.optimizer = accelerator.prepare(drafter, optimizer)   # the kind's train module
        # stepped by hand once per optimizer step (a prepared scheduler steps once per process)
        accelerator.register_for_checkpointing(self.scheduler)
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
        self.drafter.eval()
        with self.acc.autocast():
            metrics = heldout_metrics(self.target.model, self.drafter, self.heldout_batches, self.cfg.loss,
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
        self.acc.save_state(str(tmp / "accelerate"))
        # save_state ends without a barrier: every rank must have written its random_states_<rank>.pkl
        # before rank 0 lists the folder's files into meta.json and renames it
        self.acc.wait_for_everyone()
        state = self.acc.get_state_dict(self.drafter)
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.drafter).model
            state = {k.removeprefix("model."): v for k, v in state.items()}
            model.save_pretrained(tmp / "drafter", state_dict=state)
            meta = {"step": self.step, "micro_step": self.micro_step, "metrics": metrics or {},
                    "time": time.time(), "files": _file_sizes(tmp)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            complete = [c for c in list_checkpoints(self.run_dir) if is_complete(c)]
            for old in complete[: -self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def load(self, ckpt: Path) -> None:
        self.acc.load_state(str(ckpt / "accelerate"))
        meta = json.loads((ckpt / "meta.json").read_text())
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
        if acc.device.type == "cuda":
            summary["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
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
        metrics: dict = {}
        while self.step < t.max_steps:
            for _ in range(t.grad_accum):
                batch = self._batch(self.micro_step)
                self.micro_step += 1
                with acc.accumulate(self.drafter), acc.autocast():
                    loss, _, _ = forward_batch(self.target.model, self.drafter, batch, cfg.loss)
                    if not torch.isfinite(acc.reduce(loss.detach(), reduction="mean")):
                        raise TrainingDiverged(
                            f"The loss became {float(loss.detach())} at step {self.step + 1}; "
                            "the last good checkpoint is kept",
                            str(self.run_dir), "Lower train.lr or use mixed_precision=no, then --resume")
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
            self.scheduler.step()
            self.step += 1
            bar.update()
            if self.step % cfg.log.every == 0 or self.step == t.max_steps:
                rate = window_tokens / max(1e-9, time.time() - window_start)
                self.log({"loss": loss_sum / loss_n, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": rate,
                          "tokens": tokens_seen, "epoch": self.schedule.epoch_of(self.micro_step)})
                bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", tok_s=f"{rate:.0f}")
                window_start, window_tokens, loss_sum, loss_n = time.time(), 0, 0.0, 0
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
