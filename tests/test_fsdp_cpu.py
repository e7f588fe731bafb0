"""FSDP2 across two CPU processes (gloo), launched as recipes/accelerate/fsdp.yaml's header says: a tiny
small_lm and a tiny eagle3 train, are stopped mid-run (a scheduler's SIGTERM to the launcher; a SIGKILL of
the launcher and both processes), resume, and end bit for bit where an uninterrupted run (trained side by
side) ends: drafter weights, the sharded model and optimizer state (torch.distributed.checkpoint), schedule,
random states.

On CPU accelerate keeps an FSDP launch as plain DDP; train/run.py (use_fsdp_on_cpu) makes it FSDP2, so
these runs go through accelerate's FSDP paths: prepare (fully_shard), get_state_dict, save_state /
load_state. Every subprocess runs on one thread (OMP_NUM_THREADS=1), which also keeps runs reproducible.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from draftsmith.train.checkpoints import is_complete, latest_checkpoint
from draftsmith.train.config import RECIPES_DIR
from draftsmith.train.state import check_engine_pickles

from conftest import tiny_llama
from test_training import assert_equal_tree, ckpt_path
from tiny import make_tiny_tokenizer

WORDS = "the a cat dog runs fast red blue answer question capital France Paris help you code add two is what".split()
STEPS = 8
KINDS = {
    "small_lm": (),
    "eagle3": ("drafter.kind=eagle3", "drafter.draft_vocab_size=200", "drafter.ttt_steps=2"),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """tmp/{target/ (tiny Llama + tokenizer), chats.jsonl, recipe.yaml, cache/RUN/, runs/RUN/}."""
    root = tmp_path_factory.mktemp("fsdp")
    tok = make_tiny_tokenizer()
    target = tiny_llama(0, layers=2, vocab=len(tok))
    target.config.eos_token_id = tok.eos_token_id
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    rng = random.Random(0)
    with open(root / "chats.jsonl", "w") as f:
        for _ in range(40):
            messages = [{"role": ("user", "assistant")[turn % 2],
                         "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))}
                        for turn in range(rng.randint(2, 4))]
            f.write(json.dumps({"messages": messages}) + "\n")
    recipe = {
        "description": "tiny FSDP test recipe",
        "target": {"name": str(root / "target"), "dtype": "fp32"},
        "drafter": {"kind": "small_lm", "num_layers": 1, "init": "target"},
        "data": {"source": str(root / "chats.jsonl"), "max_length": 64, "heldout_fraction": 0.2},
        "train": {"max_steps": STEPS, "batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "mixed_precision": "no",
                  "seed": 0},
        "eval": {"every": 4, "batches": 2},
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"every": 1, "tensorboard": False},
        "run": {"out_dir": str(root / "runs")},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root


def launch(setup: Path, kind: str, name: str, *args: str) -> list[str]:
    """`accelerate launch --config_file recipes/accelerate/fsdp.yaml -m draftsmith.cli train ...`: 2 processes.
    Runs go side by side: each on a free port, tokenising into its own cache folder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(RECIPES_DIR / "accelerate" / "fsdp.yaml"), "--main_process_port", str(port), "-m", "draftsmith.cli", "train",
            str(setup / "recipe.yaml"), f"run.name={name}", f"data.cache_dir={setup / 'cache' / name}", *KINDS[kind],
            *args]


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """`sig` to a launcher and the processes it started, all at once."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def run(args: list[str]) -> str:
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def sharded_state(ckpt: Path, part: str, tmp_path: Path) -> dict:
    """One of FSDP's sharded folders (accelerate/pytorch_model_fsdp_0, accelerate/optimizer_0) gathered into
    one state dict, read back with weights_only=True."""
    out = tmp_path / f"{ckpt.parent.parent.name}-{part}.pt"
    dcp_to_torch_save(ckpt / "accelerate" / part, out)
    return torch.load(out, weights_only=True)


def assert_fsdp_checkpoint(ckpt: Path) -> None:
    """Written by FSDP over 2 processes: each process's shard of the model and optimizer state, full
    drafter weights beside them, and `.metadata` files that pass the check resume runs first."""
    assert is_complete(ckpt)
    files = json.loads((ckpt / "meta.json").read_text())["files"]
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {f"accelerate/{part}/.metadata", f"accelerate/{part}/__0_0.distcp",
                f"accelerate/{part}/__1_0.distcp"} <= set(files), sorted(files)
    assert {"state/rng-0.safetensors", "state/rng-1.safetensors", "drafter/model.safetensors"} <= set(files)
    check_engine_pickles(ckpt / "accelerate")


@pytest.mark.parametrize("kind, stop", [("small_lm", signal.SIGTERM), ("eagle3", signal.SIGKILL)],
                         ids=["small_lm-sigterm", "eagle3-sigkill"])
def test_fsdp2_two_cpu_processes_resume_bit_identical(setup, tmp_path, kind, stop):
    runs = setup / "runs"
    # run a (uninterrupted) and run b (stopped once its step-2 checkpoint is saved) side by side
    run_a = subprocess.Popen(launch(setup, kind, f"{kind}-a"), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    log_path = tmp_path / "b.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(launch(setup, kind, f"{kind}-b"), env=ENV, stdout=log, stderr=subprocess.STDOUT)
    run_b = runs / f"{kind}-b"
    try:
        deadline = time.time() + 300
        while not (ckpt_path(run_b, 2) / "meta.json").exists():
            assert proc.poll() is None, f"run b exited early: {log_path.read_text()[-3000:]}"
            assert time.time() < deadline, "run b saved no step-2 checkpoint within 300 s"
            time.sleep(0.002)
        finished = (ckpt_path(run_b, STEPS) / "meta.json").exists()
        if stop == signal.SIGTERM:
            os.kill(proc.pid, stop)      # the launcher passes it on to both processes
        else:
            kill_tree(proc, stop)        # the launcher and both processes at once
        proc.wait(timeout=120)
        out_a, _ = run_a.communicate(timeout=300)
    finally:
        for p in (proc, run_a):
            if p.poll() is None:
                kill_tree(p)
                p.wait()
    assert run_a.returncode == 0, out_a[-4000:]
    final_a = ckpt_path(runs / f"{kind}-a", STEPS)
    assert_fsdp_checkpoint(final_a)
    assert not finished, f"run b reached step {STEPS} before it was stopped"
    out = log_path.read_text()
    stopped_at = latest_checkpoint(run_b)
    step = int(stopped_at.name.split("-")[1])
    assert 2 <= step < STEPS
    if stop == signal.SIGTERM:
        # both processes agreed on the step, saved it and exited 143 (the launcher too)
        assert proc.returncode == 143, out[-3000:]
        assert f"SIGTERM received at step {step}; checkpoint saved" in out
    else:
        assert proc.returncode == -signal.SIGKILL
    assert_fsdp_checkpoint(stopped_at)

    resumed = run(launch(setup, kind, f"{kind}-b", "--resume"))
    assert f"resumed from {stopped_at}" in resumed
    final_b = ckpt_path(run_b, STEPS)
    assert_fsdp_checkpoint(final_b)

    # the resumed run ends exactly where the uninterrupted one does
    assert_equal_tree(load_file(final_a / "drafter" / "model.safetensors"),
                      load_file(final_b / "drafter" / "model.safetensors"), "drafter")
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert_equal_tree(sharded_state(final_a, part, tmp_path), sharded_state(final_b, part, tmp_path), part)
    assert_equal_tree(json.loads((final_a / "state" / "trainer.json").read_text()),
                      json.loads((final_b / "state" / "trainer.json").read_text()), "scheduler")
    for rank in (0, 1):
        name = f"state/rng-{rank}.safetensors"
        assert (final_a / name).read_bytes() == (final_b / name).read_bytes(), name
    meta_a, meta_b = (json.loads((c / "meta.json").read_text()) for c in (final_a, final_b))
    assert (meta_a["step"], meta_a["micro_step"]) == (meta_b["step"], meta_b["micro_step"]) == (STEPS, STEPS)
    assert meta_a["metrics"]["heldout_loss"] == meta_b["metrics"]["heldout_loss"]
