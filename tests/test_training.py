"""`draftsmith train` end to end on a tiny saved target: exact resume after SIGKILL, corrupt
checkpoints, 2-process DDP on CPU (gloo), export as a transformers assistant model, divergence,
refusing to clobber a run, max_steps=0.

Every run uses one CPU thread (OMP_NUM_THREADS=1 in subprocesses, torch.set_num_threads(1) here):
on a loaded 2-core machine a second OpenMP thread makes these tiny matmuls ~100x slower, and one
thread everywhere also keeps the in-process and the subprocess runs numerically identical.
"""

import math
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from draftsmith.cli import main
from draftsmith.distill.objective import Objective
from draftsmith.train.data import BatchSchedule
from draftsmith.train.run import train
from draftsmith.train.checkpoints import is_complete, latest_checkpoint
from draftsmith.train.trainer import TrainingDiverged

from conftest import tiny_llama
from tiny import make_tiny_tokenizer

WORDS = ("the a cat dog runs fast slow red blue green answer question capital France Paris number "
         "help you today code add two plus is what why how").split()
STEPS_A = 40
"""Steps of the shared run A: long enough that run B's SIGKILL, sent once step 4 is saved, lands
well before the end (~25 ms per step here)."""

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """tmp/{target/ (tiny Llama + tokenizer), chats.jsonl, bench.jsonl, recipe.yaml, cache/, runs/}."""
    root = tmp_path_factory.mktemp("training")
    tok = make_tiny_tokenizer()
    target = tiny_llama(0, layers=2, vocab=len(tok))
    target.config.eos_token_id = tok.eos_token_id
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    rng = random.Random(0)
    with open(root / "chats.jsonl", "w") as f:
        for _ in range(40):
            messages = []
            for turn in range(rng.randint(2, 4)):
                role = ("user", "assistant")[turn % 2]
                messages.append({"role": role, "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))})
            f.write(json.dumps({"messages": messages}) + "\n")
    (root / "bench.jsonl").write_text('{"prompt": "What is the capital of France?"}\n')
    recipe = {
        "description": "tiny test recipe",
        "target": {"name": str(root / "target"), "dtype": "fp32"},
        "drafter": {"kind": "small_lm", "num_layers": 1, "init": "target"},
        "data": {"source": str(root / "chats.jsonl"), "max_length": 64, "heldout_fraction": 0.2,
                 "cache_dir": str(root / "cache")},
        "train": {"max_steps": 8, "batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "mixed_precision": "no",
                  "seed": 0},
        "eval": {"every": 4, "batches": 2},
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"every": 1, "tensorboard": False},
        "run": {"out_dir": str(root / "runs")},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root


def cli_args(setup: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "draftsmith.cli", "train", str(setup / "recipe.yaml"), *args]


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def run_a(setup) -> Path:
    """An uninterrupted run of STEPS_A steps through the real CLI; tests only read it."""
    run_cli(cli_args(setup, "run.name=a", f"train.max_steps={STEPS_A}"))
    return setup / "runs" / "a"


def ckpt_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def assert_equal_tree(a, b, where: str = "") -> None:
    """Bit-identical nested state: tensors by torch.equal, containers key by key."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), f"{where} differs (max |a - b| {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same drafter weights, AdamW state, lr schedule and random states, bit for bit."""
    for name in ("drafter/model.safetensors", "state/optimizer.safetensors"):
        assert_equal_tree(load_file(a / name), load_file(b / name), name)
    assert_equal_tree(json.loads((a / "state" / "trainer.json").read_text()),
                      json.loads((b / "state" / "trainer.json").read_text()), "scheduler")
    assert (a / "state" / "rng-0.safetensors").read_bytes() == (b / "state" / "rng-0.safetensors").read_bytes()
    meta_a, meta_b = (json.loads((c / "meta.json").read_text()) for c in (a, b))
    assert (meta_a["step"], meta_a["micro_step"]) == (meta_b["step"], meta_b["micro_step"])


# ------------------------------------------------------------------------------------ resume

def train_until_checkpoint(setup, tmp_path, name: str, step: int) -> tuple[subprocess.Popen, Path, Path]:
    """`draftsmith train` run `name` (STEPS_A steps) in a subprocess, returned once checkpoint `step`
    is written: (process, run folder, log file)."""
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cli_args(setup, f"run.name={name}", f"train.max_steps={STEPS_A}"), env=ENV,
                                stdout=log, stderr=subprocess.STDOUT)
    run_dir = setup / "runs" / name
    deadline = time.time() + 120
    try:
        while not (ckpt_path(run_dir, step) / "meta.json").exists():
            assert proc.poll() is None, f"run {name} exited early: {log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"run {name} saved no step-{step} checkpoint within 120 s"
            time.sleep(0.002)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, run_dir, log_path


def test_resume_after_sigkill_is_bit_identical(setup, run_a, tmp_path):
    proc, run_b, _ = train_until_checkpoint(setup, tmp_path, "b", 4)
    try:
        finished = (ckpt_path(run_b, STEPS_A) / "meta.json").exists()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not finished, f"run B reached step {STEPS_A} before the kill; raise STEPS_A"
    killed_at = latest_checkpoint(run_b)
    assert killed_at is not None and 4 <= int(killed_at.name.split("-")[1]) < STEPS_A

    resumed = run_cli(cli_args(setup, "run.name=b", f"train.max_steps={STEPS_A}", "--resume"))
    assert f"resumed from {killed_at}" in resumed.stdout
    assert_same_checkpoint(ckpt_path(run_a, STEPS_A), ckpt_path(run_b, STEPS_A))


def test_sigterm_saves_a_checkpoint_and_resume_finishes_bit_identical(setup, run_a, tmp_path):
    """A scheduler's SIGTERM: the step in flight finishes, a checkpoint of it is saved, exit 143; --resume
    then ends exactly where an uninterrupted run does."""
    proc, run_c, log_path = train_until_checkpoint(setup, tmp_path, "c", 2)
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    out = log_path.read_text()
    assert proc.returncode == 143, out[-3000:]
    stopped_at = latest_checkpoint(run_c)
    step = int(stopped_at.name.split("-")[1])
    assert 2 <= step < STEPS_A and is_complete(stopped_at)
    assert f"SIGTERM received at step {step}; checkpoint saved" in out
    assert not (run_c / "summary.json").exists()       # a stopped run is not a finished one
    assert json.loads((run_c / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": step, "stopped": "SIGTERM"}
    resumed = run_cli(cli_args(setup, "run.name=c", f"train.max_steps={STEPS_A}", "--resume"))
    assert f"resumed from {stopped_at}" in resumed.stdout
    assert_same_checkpoint(ckpt_path(run_a, STEPS_A), ckpt_path(run_c, STEPS_A))


def test_corrupt_checkpoint_is_skipped(setup, run_a, tmp_path):
    shutil.copytree(run_a, tmp_path / "a")
    run_dir = tmp_path / "a"
    newest, previous = ckpt_path(run_dir, STEPS_A), ckpt_path(run_dir, STEPS_A - 2)
    weights = newest / "drafter" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert not is_complete(newest) and is_complete(previous)
    with pytest.warns(UserWarning, match="skipping incomplete or corrupt checkpoint .*step-0000040"):
        assert latest_checkpoint(run_dir) == previous

    with pytest.warns(UserWarning, match="skipping incomplete or corrupt checkpoint"):
        summary = train(str(setup / "recipe.yaml"), [f"run.out_dir={tmp_path}", "run.name=a",
                                                     f"train.max_steps={STEPS_A}"], resume=True)
    assert summary["step"] == STEPS_A
    # two steps redone from the previous checkpoint land exactly where the uninterrupted run did
    assert_same_checkpoint(ckpt_path(run_a, STEPS_A), newest)


# ------------------------------------------------------------------------------------ DDP

def test_batch_schedule_ranks_split_the_global_batch():
    one = BatchSchedule(40, 4, world_size=1, rank=0, seed=3)
    ranks = [BatchSchedule(40, 2, world_size=2, rank=r, seed=3) for r in (0, 1)]
    for m in range(30):   # three epochs
        halves = [s.indices(m) for s in ranks]
        assert halves[0] + halves[1] == one.indices(m)
        assert len(set(halves[0]) | set(halves[1])) == 4


def test_two_process_ddp_gloo(setup, tmp_path):
    """Two CPU processes (torchrun, gloo) against one process with grad_accum=2 reading the same
    4 rows per step: the rank-mean of per-rank gradients equals the accumulated mean of two
    micro-batches, so the weights agree only if every step all-reduced the gradients of both
    ranks, each computed on its own half of the global batch with weights equal to rank 0's."""
    run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "draftsmith.cli", "train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=ddp"])
    ddp = ckpt_path(tmp_path / "ddp", 8)
    assert is_complete(ddp)
    assert {"state/rng-0.safetensors", "state/rng-1.safetensors"} <= set(
        json.loads((ddp / "meta.json").read_text())["files"])
    train(str(setup / "recipe.yaml"), [f"run.out_dir={tmp_path}", "run.name=ref", "train.grad_accum=2"])
    ref = ckpt_path(tmp_path / "ref", 8)
    w_ddp, w_ref = load_file(ddp / "drafter" / "model.safetensors"), load_file(ref / "drafter" / "model.safetensors")
    assert w_ddp.keys() == w_ref.keys()
    for key in w_ref:   # all-reduce and accumulation sum in different orders: equal up to rounding
        torch.testing.assert_close(w_ddp[key], w_ref[key], rtol=1e-5, atol=1e-6, msg=key)
    loss_ddp, loss_ref = (json.loads((c / "meta.json").read_text())["metrics"]["heldout_loss"] for c in (ddp, ref))
    assert loss_ddp == pytest.approx(loss_ref, rel=1e-4)


# ------------------------------------------------------------------------------------ export

def test_export_hf_works_as_assistant_model(setup, run_a, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    assert main(["export", str(run_a), "--format", "hf", "--out", str(out)]) == 0
    for name in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md"]:
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert str(setup / "target") in card and f"| steps | {STEPS_A} of {STEPS_A} |" in card

    drafter = AutoModelForCausalLM.from_pretrained(out).eval()
    target = AutoModelForCausalLM.from_pretrained(setup / "target").eval()
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "max_new_tokens": 20,
              "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        plain = target.generate(ids, **kwargs)
        assisted = target.generate(ids, assistant_model=drafter, **kwargs)
    assert assisted.tolist() == plain.tolist()

    report_dir = tmp_path / "eval"
    assert main(["eval", "--target", str(setup / "target"), "--drafter", str(out), "--bench",
                 str(setup / "bench.jsonl"), "--max-new-tokens", "20", "--k", "3", "--device", "cpu",
                 "--out", str(report_dir)]) == 0
    capsys.readouterr()
    report = json.loads((report_dir / "report.json").read_text())
    assert report["lossless_match_rate"] == 1.0 and report["num_prompts"] == 1


# ------------------------------------------------------------------------------------ failures

def test_nan_loss_stops_with_step_number(setup, tmp_path, monkeypatch):
    real, calls = Objective.rows, []

    def nan_at_step_3(*args, **kwargs):
        loss, alpha = real(*args, **kwargs)
        if torch.is_grad_enabled():   # training forwards only; held-out evaluation runs under no_grad
            calls.append(1)
            if len(calls) == 3:
                return loss * float("nan"), alpha
        return loss, alpha

    monkeypatch.setattr(Objective, "rows", nan_at_step_3)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3") as info:
        train(str(setup / "recipe.yaml"), [f"run.out_dir={tmp_path}", "run.name=nan"])
    assert "Lower train.lr" in str(info.value)
    run_dir = tmp_path / "nan"
    assert [c.name for c in (run_dir / "checkpoints").glob("step-*")] == ["step-0000002"]
    assert latest_checkpoint(run_dir) == ckpt_path(run_dir, 2) and is_complete(ckpt_path(run_dir, 2))


def test_refuses_existing_run_without_resume(setup, run_a, capsys):
    before = sorted(p.name for p in (run_a / "checkpoints").iterdir())
    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={run_a.parent}", "run.name=a"]) == 2
    err = capsys.readouterr().err
    assert "draftsmith: error: The run folder already holds checkpoints" in err
    assert str(run_a) in err and "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == before


def test_max_steps_zero_saves_an_evaluated_checkpoint(setup, tmp_path):
    summary = train(str(setup / "recipe.yaml"), [f"run.out_dir={tmp_path}", "run.name=zero", "train.max_steps=0"])
    run_dir = tmp_path / "zero"
    ckpt = ckpt_path(run_dir, 0)
    assert summary["step"] == 0 and summary["heldout_loss"] > 0
    assert latest_checkpoint(run_dir) == ckpt
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 0 and meta["metrics"]["heldout_loss"] == summary["heldout_loss"]
    # untrained: the drafter is still its initialisation from the target
    drafter = load_file(ckpt / "drafter" / "model.safetensors")
    target = load_file(setup / "target" / "model.safetensors")
    assert torch.equal(drafter["model.embed_tokens.weight"], target["model.embed_tokens.weight"])
    assert torch.equal(drafter["model.layers.0.mlp.up_proj.weight"], target["model.layers.1.mlp.up_proj.weight"])


def test_deepspeed_on_cpu_is_refused_not_silently_ddp(setup, tmp_path):
    """accelerate 1.16 keeps DeepSpeed for accelerator devices: a CPU launch with deepspeed_zero2.yaml trained
    as plain DDP and wrote no engine state. It is refused, naming what runs on CPU instead."""
    from draftsmith.train.config import RECIPES_DIR

    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(RECIPES_DIR / "accelerate" / "deepspeed_zero2.yaml"), "-m", "draftsmith.cli", "train",
                           str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=ds"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "DeepSpeed through accelerate does not run on CPU processes" in done.stderr and "fsdp.yaml" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "ds" / "checkpoints").exists()


def test_eagle_trains_exports_and_decodes_losslessly(setup, tmp_path, capsys):
    """Kind eagle through the real CLI: train (feature + distribution loss), export, eval."""
    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=eagle",
                 "drafter.kind=eagle", "train.max_steps=12", "train.lr=3e-3", "eval.every=6"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "eagle" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "eagle"), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["draftsmith_kind"] == "eagle"
    # speculators 0.9.0 has no EAGLE-1 type, so vLLM's format is refused for kind eagle (nothing written)
    assert main(["export", str(tmp_path / "eagle"), "--format", "speculators", "--out", str(tmp_path / "spec")]) == 2
    assert "speculators has no EAGLE-1" in capsys.readouterr().err and not (tmp_path / "spec").exists()
    for fmt in ("sglang",):      # SGLang's EAGLE-1 layout loads back losslessly
        assert main(["export", str(tmp_path / "eagle"), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        assert main(["eval", "--target", str(setup / "target"), "--drafter", str(tmp_path / fmt), "--bench",
                     str(setup / "bench.jsonl"), "--max-new-tokens", "12", "--k", "3", "--device", "cpu",
                     "--no-hf-assisted", "--out", str(tmp_path / f"eval-{fmt}")]) == 0
        assert json.loads((tmp_path / f"eval-{fmt}" / "report.json").read_text())["lossless_match_rate"] == 1.0
    assert main(["eval", "--target", str(setup / "target"), "--drafter", str(out), "--bench",
                 str(setup / "bench.jsonl"), "--max-new-tokens", "20", "--k", "3", "--device", "cpu",
                 "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["lossless_match_rate"] == 1.0 and report["hf_assisted_tokens_per_s"] is None


def test_eagle3_trains_exports_both_formats_and_decodes_losslessly(setup, tmp_path, capsys):
    """Kind eagle3 through the real CLI: a reduced draft vocabulary from the data, the unrolled
    training-time test with per-step acceptance logged, speculators + SGLang exports, lossless eval."""
    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=e3",
                 "drafter.kind=eagle3", "drafter.draft_vocab_size=200", "drafter.ttt_steps=3",
                 "train.max_steps=12", "train.lr=3e-3", "eval.every=6"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "e3" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    evals = [x for x in lines if "ttt_greedy_match_step2" in x]
    assert evals and all(0 <= x[f"ttt_greedy_match_step{i}"] <= 1 for x in evals for i in range(3))
    for fmt in ("speculators", "sglang"):
        out = tmp_path / fmt
        assert main(["export", str(tmp_path / "e3"), "--format", fmt, "--out", str(out)]) == 0
        assert json.loads((out / "draftsmith.json").read_text())["format"] == fmt
        assert main(["eval", "--target", str(setup / "target"), "--drafter", str(out), "--bench",
                     str(setup / "bench.jsonl"), "--max-new-tokens", "20", "--k", "3", "--device", "cpu",
                     "--out", str(tmp_path / f"eval-{fmt}")]) == 0
        report = json.loads((tmp_path / f"eval-{fmt}" / "report.json").read_text())
        assert report["lossless_match_rate"] == 1.0
    assert main(["export", str(tmp_path / "e3"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["draftsmith_kind"] == "eagle3"
    # warm start from the vLLM export: the new run begins exactly at the exported head (and its
    # 200-token draft vocabulary, although the recipe would now pick 100)
    from draftsmith.models.formats import read_head_folder

    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=warm",
                 "drafter.kind=eagle3", "drafter.draft_vocab_size=100", "drafter.ttt_steps=3",
                 f"drafter.init_from={tmp_path / 'speculators'}", "train.max_steps=0"]) == 0
    exported = read_head_folder(tmp_path / "speculators").state_dict()
    assert_equal_tree({k: v.float() if v.is_floating_point() else v for k, v in exported.items()},
                      load_file(ckpt_path(tmp_path / "warm", 0) / "drafter" / "model.safetensors"), "warm start")
    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=wrong",
                 "drafter.kind=eagle", f"drafter.init_from={tmp_path / 'speculators'}"]) == 2
    assert "another kind of drafter than the recipe's" in capsys.readouterr().err
    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=wrong",
                 "drafter.kind=eagle3", f"drafter.init_from={tmp_path}"]) == 2
    assert "not a drafter folder" in capsys.readouterr().err


def test_small_lm_refuses_serving_formats(setup, run_a, tmp_path, capsys):
    assert main(["export", str(run_a), "--format", "sglang", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "EAGLE and block-drafter heads" in err and "small_lm" in err and "--format hf" in err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ prepared data

def test_prepared_data_trains_like_the_raw_data(setup, tmp_path, capsys):
    """`draftsmith data prepare` keeps the rows, the split and the order: a run on the prepared folder
    ends with the same drafter, bit for bit, as the same run tokenising the raw data itself."""
    recipe = str(setup / "recipe.yaml")
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", recipe, "--out", str(prepared)]) == 0
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["train"]["rows"] > 0 and meta["heldout"]["rows"] > 0 and meta["max_length"] == 64
    assert f"data.source={prepared}" in capsys.readouterr().out
    common = [f"run.out_dir={tmp_path}", "train.max_steps=3"]
    train(recipe, [*common, "run.name=raw"])
    train(recipe, [*common, "run.name=from-prepared", f"data.source={prepared}"])
    assert_equal_tree(load_file(ckpt_path(tmp_path / "raw", 3) / "drafter" / "model.safetensors"),
                      load_file(ckpt_path(tmp_path / "from-prepared", 3) / "drafter" / "model.safetensors"), "drafter")
    # a second prepare into the same folder is refused without --overwrite
    assert main(["data", "prepare", recipe, "--out", str(prepared)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_prepared_data_refuses_other_settings_and_tokenizers(setup, tmp_path, capsys):
    from draftsmith.errors import DraftsmithError

    recipe = str(setup / "recipe.yaml")
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", recipe, "--out", str(prepared)]) == 0
    common = [f"run.out_dir={tmp_path}", "train.max_steps=1", f"data.source={prepared}"]
    with pytest.raises(DraftsmithError, match="other data settings") as info:
        train(recipe, [*common, "run.name=x", "data.max_length=32"])
    assert "data.max_length: prepared 64, run 32" in str(info.value)
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps({**meta, "tokenizer": "0" * 20}))
    with pytest.raises(DraftsmithError, match="another tokenizer") as info:
        train(recipe, [*common, "run.name=y"])
    assert "draftsmith data prepare" in str(info.value)
    (prepared / "meta.json").write_text(json.dumps({**meta, "format": "something/9"}))
    with pytest.raises(DraftsmithError, match="not draftsmith prepared data"):
        train(recipe, [*common, "run.name=z"])
    (prepared / "meta.json").write_text("{broken")
    with pytest.raises(DraftsmithError, match="meta.json is not valid JSON"):
        train(recipe, [*common, "run.name=z"])
    (prepared / "meta.json").write_text(json.dumps(meta))
    (prepared / "heldout.npz").unlink()
    with pytest.raises(DraftsmithError, match="incomplete") as info:
        train(recipe, [*common, "run.name=z"])
    assert "no heldout.npz" in str(info.value)


def test_token_rows_round_trip_any_vocabulary(tmp_path):
    from draftsmith.train.prepared import read_rows, write_rows

    rng = torch.Generator().manual_seed(0)
    for vocab in (50, 2**16, 262_144):
        rows = [{"input_ids": torch.randint(0, vocab, (n,), generator=rng).tolist(),
                 "loss_mask": (torch.rand(n, generator=rng) > 0.5).tolist()} for n in (1, 7, 13, 64)]
        counts = write_rows(rows, tmp_path / f"{vocab}.npz")
        back = read_rows(tmp_path / f"{vocab}.npz")
        assert counts == {"rows": 4, "tokens": 85, "assistant_tokens": sum(sum(r["loss_mask"]) for r in rows)}
        assert len(back) == 4 and back.num_tokens == 85
        for mine, theirs in zip(rows, back):
            assert theirs["input_ids"].tolist() == mine["input_ids"]
            assert theirs["loss_mask"].tolist() == mine["loss_mask"]
        assert back[-1]["input_ids"].tolist() == rows[-1]["input_ids"]


def test_resume_with_changed_settings_says_what_changed_and_keeps_the_old_config(setup, tmp_path, capsys):
    common = [f"run.out_dir={tmp_path}", "run.name=changed", "checkpoint.every=2"]
    train(str(setup / "recipe.yaml"), [*common, "train.max_steps=2"])
    capsys.readouterr()
    train(str(setup / "recipe.yaml"), [*common, "train.max_steps=4", "train.lr=5e-4"], resume=True)
    err = capsys.readouterr().err
    assert "resuming at step 2 with changed settings" in err
    assert "train.lr: 0.001 -> 0.0005" in err and "train.max_steps: 2 -> 4" in err
    run_dir = tmp_path / "changed"
    kept = yaml.safe_load((run_dir / "config-until-step-0000002.yaml").read_text())
    assert kept["train"]["lr"] == 1e-3 and yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 5e-4
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["resumed_with_changes"]["train.lr"] for x in lines if "resumed_with_changes" in x] == [[1e-3, 5e-4]]
    capsys.readouterr()
    train(str(setup / "recipe.yaml"), [*common, "train.max_steps=6", "train.lr=5e-4"], resume=True)
    assert "train.lr" not in capsys.readouterr().err        # only what changed this time: max_steps 4 -> 6


def test_nan_loss_before_any_checkpoint_says_there_is_none(setup, tmp_path, monkeypatch):
    real = Objective.rows

    def nan_at_once(*args, **kwargs):
        loss, alpha = real(*args, **kwargs)
        return (loss * float("nan"), alpha) if torch.is_grad_enabled() else (loss, alpha)

    monkeypatch.setattr(Objective, "rows", nan_at_once)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1; no checkpoint was saved before it") as info:
        train(str(setup / "recipe.yaml"), [f"run.out_dir={tmp_path}", "run.name=nan0"])
    assert "--overwrite" in str(info.value) and "last good checkpoint" not in str(info.value)


def test_the_frozen_target_trains_in_bf16_under_bf16_autocast_and_as_asked_otherwise():
    from types import SimpleNamespace
    from draftsmith.train.run import training_target_dtype

    def acc(precision):
        return SimpleNamespace(state=SimpleNamespace(mixed_precision=precision), device=torch.device("cpu"))
    assert training_target_dtype("auto", acc("bf16")) == torch.bfloat16
    assert training_target_dtype("auto", acc("no")) == torch.float32
    assert training_target_dtype("fp32", acc("bf16")) == torch.float32      # an explicit dtype is kept
    assert training_target_dtype("bf16", acc("no")) == torch.bfloat16
