"""Run folders that cannot lose work or run code (issue 9): plain run names, the --overwrite rule
(markers), one process per run (lock), refused resumes, no pickle loaded from a run / export /
drafter / prepared-data folder, checkpoint hashes with fallback, a full disk during a save, and
exports that never follow a symbolic link.

The runs are tiny (the saved target and recipe of test_training.py), trained in-process on one thread.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from draftsmith.cli import main
from draftsmith.errors import DraftsmithError
from draftsmith.folders import MARKER, marker_kind
from draftsmith.train import state as training_state
from draftsmith.train.checkpoints import file_digests, latest_checkpoint
from draftsmith.train.run import train

from test_training import ENV, ckpt_path, setup  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


class Payload:
    """A pickle that creates a folder when it is unpickled: proof that a load ran code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def plant(path: Path, witness: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": Payload(witness)}, path)


def reseal(ckpt: Path) -> None:
    """Rewrite meta.json's sizes and hashes for the files now in `ckpt` (what an attacker can do too)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").unlink()
    meta["files"], meta["sha256"] = file_digests(ckpt)
    (ckpt / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def base(setup) -> Path:
    """A 4-step small_lm run with checkpoints step-2 and step-4; tests copy it before changing it."""
    train(str(setup / "recipe.yaml"), [f"run.out_dir={setup / 'safety'}", "run.name=base", "train.max_steps=4"])
    return setup / "safety" / "base"


def copy_run(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "base"
    shutil.copytree(base, run, symlinks=True)
    return run


def resume(setup, run: Path, *extra: str, steps: int = 6) -> dict:
    return train(str(setup / "recipe.yaml"), [f"run.out_dir={run.parent}", f"run.name={run.name}",
                                              f"train.max_steps={steps}", *extra], resume=True)


# ------------------------------------------------------------------------------------ run names

@pytest.mark.parametrize("name", [".", "..", "a/b", "a\\b", "x\0y"])
def test_run_name_is_one_plain_folder_name(setup, tmp_path, capsys, name):
    keep = tmp_path / "P" / "runs" / "old-run"
    keep.mkdir(parents=True)
    (keep / "weights").write_text("precious")
    (tmp_path / "P" / "notes.txt").write_text("precious")
    code = main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path / 'P' / 'runs'}", f"run.name={name}",
                 "--overwrite"])
    assert code == 2
    assert "run.name" in capsys.readouterr().err
    assert (keep / "weights").read_text() == "precious" and (tmp_path / "P" / "notes.txt").exists()


def test_run_name_check_without_the_recipe_parser(tmp_path):
    from types import SimpleNamespace

    from draftsmith.train.run import run_folder

    for name in ("", " ", " x", ".", "..", "a/..", "/abs"):
        cfg = SimpleNamespace(run=SimpleNamespace(name=name, out_dir=str(tmp_path)))
        with pytest.raises(DraftsmithError, match="run.name must be one plain folder name"):
            run_folder(cfg)
    assert run_folder(SimpleNamespace(run=SimpleNamespace(name="ok.v2", out_dir=str(tmp_path)))) == tmp_path / "ok.v2"


def test_run_folder_outside_out_dir_or_a_file_is_refused(setup, tmp_path):
    recipe = str(setup / "recipe.yaml")
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DraftsmithError, match="resolves outside run.out_dir"):
        train(recipe, [f"run.out_dir={tmp_path / 'runs'}", "run.name=link"], overwrite=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DraftsmithError, match="run.out_dir is a file"):
        train(recipe, [f"run.out_dir={tmp_path / 'a-file'}", "run.name=r"])
    (tmp_path / "runs" / "plain-file").write_text("x")
    with pytest.raises(DraftsmithError, match="run folder is a file"):
        train(recipe, [f"run.out_dir={tmp_path / 'runs'}", "run.name=plain-file"])
    foreign = tmp_path / "runs" / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DraftsmithError, match="not a draftsmith run"):
        train(recipe, [f"run.out_dir={tmp_path / 'runs'}", "run.name=foreign"])
    with pytest.raises(DraftsmithError, match="has no .draftsmith marker"):
        train(recipe, [f"run.out_dir={tmp_path / 'runs'}", "run.name=foreign"], overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


# ------------------------------------------------------------------------------- --overwrite

def test_markers_in_every_folder_draftsmith_writes(setup, base, tmp_path, capsys):
    assert marker_kind(base) == "run"
    assert main(["export", str(base), "--format", "hf", "--out", str(tmp_path / "export")]) == 0
    assert marker_kind(tmp_path / "export") == "export"
    assert main(["data", "prepare", str(setup / "recipe.yaml"), "--out", str(tmp_path / "data")]) == 0
    assert marker_kind(tmp_path / "data") == "data"
    assert main(["eval", "--target", str(setup / "target"), "--drafter", "prompt-lookup", "--bench",
                 str(setup / "bench.jsonl"), "--max-new-tokens", "4", "--device", "cpu", "--no-hf-assisted",
                 "--out", str(tmp_path / "eval")]) == 0
    assert marker_kind(tmp_path / "eval") == "eval"
    marker = json.loads((tmp_path / "eval" / MARKER).read_text())
    assert marker["written_by"] == "draftsmith" and {"version", "time"} <= set(marker)
    # --overwrite replaces a folder of the same kind
    assert main(["export", str(base), "--format", "hf", "--out", str(tmp_path / "export"), "--overwrite"]) == 0
    capsys.readouterr()


def test_overwrite_never_replaces_the_run_cwd_a_parent_or_a_foreign_folder(setup, base, tmp_path, capsys,
                                                                            monkeypatch):
    run = copy_run(base, tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())

    def refused(args: list[str], *words: str) -> None:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        for word in words:
            assert word in err, (word, err)

    export = ["export", str(run), "--format", "hf", "--overwrite", "--out"]
    refused(export + [str(run)], "it is a folder this command reads")
    refused(export + [str(run.parent)], "a folder this command reads")
    refused(export + [str(tmp_path)], "a folder this command reads")
    monkeypatch.chdir(tmp_path / "runs")
    refused(export + ["."], "working directory")
    monkeypatch.chdir(run / "checkpoints")
    refused(export + [str(tmp_path / "runs")], "working directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)       # an empty working directory is no output folder either
    refused(export + ["."], "working directory")
    refused(["export", str(run), "--format", "hf", "--out", "."], "working directory")
    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    refused(export + [str(foreign)], "has no .draftsmith marker", str(foreign))
    refused(["eval", "--target", str(setup / "target"), "--drafter", "prompt-lookup", "--bench",
             str(setup / "bench.jsonl"), "--out", str(foreign), "--overwrite"], "has no .draftsmith marker")
    refused(["data", "prepare", str(setup / "recipe.yaml"), "--out", str(foreign), "--overwrite"],
            "has no .draftsmith marker")
    refused(["export", str(run), "--out", str(foreign)], "not empty", "--overwrite")
    # a run is never replaced by an export, even one draftsmith wrote
    other = tmp_path / "other-run"
    shutil.copytree(base, other)
    refused(export + [str(other)], "refuses to replace a training run with an export")
    # a symbolic link is never an output folder
    (tmp_path / "link").symlink_to(tmp_path / "somewhere")
    refused(["export", str(run), "--format", "hf", "--out", str(tmp_path / "link")], "symbolic link")
    assert not (tmp_path / "somewhere").exists()
    assert (foreign / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == before


# ------------------------------------------------------------------------------------ the lock

def test_a_second_process_is_refused_and_a_stale_lock_taken_over(setup, base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from draftsmith.train.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"), str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DraftsmithError, match=f"Another draftsmith process .* held by pid {holder.pid}@"):
            resume(setup, run)
        assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={run.parent}", "run.name=base",
                     "--overwrite"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert (run / "checkpoints" / "step-0000004").is_dir()     # --overwrite deleted nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file still names it, and is taken over
    assert (run / ".lock").read_text().startswith(f"{holder.pid}@")
    assert resume(setup, run)["step"] == 6
    assert f"taking over the lock of {run} left by pid {holder.pid}" in capsys.readouterr().out
    assert (run / ".lock").read_text() == ""        # released at the end


# --------------------------------------------------------------------------------- resume

def test_resume_refuses_without_a_usable_checkpoint(setup, base, tmp_path):
    recipe = str(setup / "recipe.yaml")
    with pytest.raises(DraftsmithError, match="--resume found no run folder"):
        train(recipe, [f"run.out_dir={tmp_path}", "run.name=never-trained"], resume=True)
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    (empty / "config.yaml").write_text((base / "config.yaml").read_text())
    with pytest.raises(DraftsmithError, match="--resume found no checkpoint to continue from"):
        train(recipe, [f"run.out_dir={empty.parent}", "run.name=empty"], resume=True)
    assert not (empty / "checkpoints").exists()

    run = copy_run(base, tmp_path)
    for step in (2, 4):
        weights = ckpt_path(run, step) / "drafter" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    with pytest.warns(UserWarning, match="skipping incomplete or corrupt"):
        with pytest.raises(DraftsmithError, match="no usable checkpoint") as info:
            resume(setup, run)
    assert "step-0000002: drafter/model.safetensors does not match its sha256" in str(info.value)


def test_resume_with_another_drafter_shape_is_refused(setup, base, tmp_path):
    run = copy_run(base, tmp_path)
    config = (run / "config.yaml").read_text()
    with pytest.raises(DraftsmithError, match="another shape than the checkpoint's") as info:
        resume(setup, run, "drafter.num_layers=2")
    assert "model.layers.1." in str(info.value) and "config.yaml" in str(info.value)
    assert (run / "config.yaml").read_text() == config      # the refused resume changed nothing


# --------------------------------------------------------------------------------- no pickle

def test_no_pickle_is_loaded_from_a_checkpoint(setup, base, tmp_path):
    witness = tmp_path / "code-ran"
    plant(tmp_path / "probe.pkl", witness)
    torch.load(tmp_path / "probe.pkl", weights_only=False)        # the payload is live ...
    assert witness.is_dir()
    witness.rmdir()
    # the scheduler file accelerate unpickled with weights_only=False; then every name a loader might try
    planted = [("accelerate/custom_checkpoint_0.pkl",),
               ("accelerate/custom_checkpoint_0.pkl", "accelerate/random_states_0.pkl", "accelerate/optimizer.bin",
                "accelerate/scheduler.bin", "accelerate/pytorch_model.bin", "drafter/pytorch_model.bin",
                "state/optimizer.bin", "state/scheduler.pkl")]
    for i, names in enumerate(planted):
        run = copy_run(base, tmp_path / str(i))
        newest = ckpt_path(run, 4)
        for rel in names:
            plant(newest / rel, witness)
        reseal(newest)
        assert resume(setup, run)["step"] == 6                     # ... and resume reads only the safe files
        assert not witness.exists()

    # a checkpoint in the format before this one (accelerate's files) is read with weights_only=True
    run = copy_run(base, tmp_path / "legacy")
    newest = ckpt_path(run, 4)
    shutil.rmtree(newest / "state")
    for rel in ("accelerate/custom_checkpoint_0.pkl", "accelerate/random_states_0.pkl", "accelerate/optimizer.bin"):
        plant(newest / rel, witness)
    meta = json.loads((newest / "meta.json").read_text())
    del meta["format"], meta["sha256"]
    meta["files"] = {rel: (newest / rel).stat().st_size for rel in file_digests(newest)[0] if rel != "meta.json"}
    (newest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DraftsmithError, match="training state could not be loaded"):
        resume(setup, run)
    assert not witness.exists()


def test_sharded_checkpoint_metadata_is_checked_before_torch_distributed_reads_it(tmp_path):
    """FSDP's checkpoints (torch.distributed.checkpoint) keep a `.metadata` file that torch reads with plain
    pickle.load: a real one passes the check, a planted one is refused without running."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Linear(4, 4, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # "assuming the intent is to save in a single process"
        weights, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": weights}, checkpoint_id=tmp_path / "real" / "pytorch_model_fsdp_0")
        dcp.save({"optimizer": optimizer_state}, checkpoint_id=tmp_path / "real" / "optimizer_0")
    training_state.check_engine_pickles(tmp_path / "real")
    witness = tmp_path / "code-ran"
    planted = tmp_path / "planted" / "optimizer_0" / ".metadata"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(pickle.dumps(Payload(witness)))
    with pytest.raises(DraftsmithError, match="posix.mkdir is not among the types"):
        training_state.check_engine_pickles(tmp_path / "planted")
    assert not witness.exists()


def to_legacy(ckpt: Path) -> None:
    """Rewrite a checkpoint as draftsmith wrote them before its pickle-free format: accelerate's
    optimizer.bin, custom_checkpoint_0.pkl (the scheduler) and random_states_0.pkl, sizes only in meta."""
    import numpy as np
    from safetensors import safe_open

    small = training_state.join_tensors(json.loads((ckpt / "state" / "trainer.json").read_text()),
                                        load_file(ckpt / "state" / "optimizer.safetensors"))
    with safe_open(str(ckpt / "state" / "rng-0.safetensors"), framework="pt") as f:
        scalars, rng = json.loads(f.metadata()["scalars"]), {k: f.get_tensor(k) for k in f.keys()}
    (ckpt / "accelerate").mkdir()
    torch.save(small["optimizer"], ckpt / "accelerate" / "optimizer.bin")
    torch.save(small["scheduler"], ckpt / "accelerate" / "custom_checkpoint_0.pkl")
    version, gauss = scalars["python"]
    name, pos, has_gauss, cached = scalars["numpy"]
    torch.save({"step": small["accelerator_step"], "random_state": (version, tuple(rng["python"].tolist()), gauss),
                "numpy_random_seed": (name, rng["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
                "torch_manual_seed": rng["torch"]}, ckpt / "accelerate" / "random_states_0.pkl")
    shutil.rmtree(ckpt / "state")
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["format"], meta["sha256"]
    meta["files"] = {rel: size for rel, size in file_digests(ckpt)[0].items() if rel != "meta.json"}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_from_before_the_pickle_free_format_still_resumes(setup, base, tmp_path):
    new, old = copy_run(base, tmp_path / "new"), copy_run(base, tmp_path / "old")
    to_legacy(ckpt_path(old, 4))
    assert resume(setup, new)["step"] == resume(setup, old)["step"] == 6
    for name in ("drafter/model.safetensors", "state/optimizer.safetensors"):
        a, b = load_file(ckpt_path(new, 6) / name), load_file(ckpt_path(old, 6) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_no_pickle_is_loaded_from_drafter_or_data_folders(setup, base, tmp_path, capsys):
    witness = tmp_path / "code-ran"
    recipe = str(setup / "recipe.yaml")
    # an exported drafter whose weights are a pickle
    assert main(["export", str(base), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    (tmp_path / "hf" / "model.safetensors").unlink()
    plant(tmp_path / "hf" / "pytorch_model.bin", witness)
    try:
        main(["eval", "--target", str(setup / "target"), "--drafter", str(tmp_path / "hf"), "--bench",
              str(setup / "bench.jsonl"), "--max-new-tokens", "4", "--device", "cpu", "--no-hf-assisted",
              "--out", str(tmp_path / "eval")])
    except Exception:
        pass                 # refusing is fine (the loaders are weights_only); running the payload is not
    assert not witness.exists()
    # an EAGLE head to warm-start from
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text(json.dumps({"draftsmith_kind": "eagle", "architectures": ["EagleHead"]}))
    plant(head / "pytorch_model.bin", witness)
    try:
        train(recipe, [f"run.out_dir={tmp_path}", "run.name=warm", "drafter.kind=eagle",
                       f"drafter.init_from={head}", "train.max_steps=0"])
    except Exception:
        pass
    assert not witness.exists()
    # prepared data whose token file is a pickle
    assert main(["data", "prepare", recipe, "--out", str(tmp_path / "data")]) == 0
    plant(tmp_path / "data" / "train.npz", witness)
    with pytest.raises(DraftsmithError, match="token file train.npz cannot be read"):
        train(recipe, [f"run.out_dir={tmp_path / 'runs'}", "run.name=data", f"data.source={tmp_path / 'data'}"])
    assert not witness.exists()
    capsys.readouterr()


# ---------------------------------------------------------------------------- integrity

def test_damaged_files_fall_back_to_the_previous_checkpoint(setup, base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    weights = ckpt_path(run, 4) / "drafter" / "model.safetensors"
    with open(weights, "r+b") as f:          # same size: only the hash can tell
        f.seek(8192)
        f.write(bytes(64 * 1024))
    with pytest.warns(UserWarning, match="step-0000004: drafter/model.safetensors does not match its sha256"):
        assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "draftsmith.json").read_text())["step"] == 2
    with pytest.warns(UserWarning, match="drafter/model.safetensors does not match its sha256"):
        assert resume(setup, run)["step"] == 6
    assert f"resumed from {ckpt_path(run, 2)}" in capsys.readouterr().out

    run = copy_run(base, tmp_path / "optimizer")
    optimizer = ckpt_path(run, 4) / "state" / "optimizer.safetensors"
    optimizer.write_bytes(os.urandom(optimizer.stat().st_size))
    with pytest.warns(UserWarning, match="state/optimizer.safetensors does not match its sha256"):
        assert resume(setup, run, steps=4)["step"] == 4
    # the step 4 redone from step 2 is the undamaged run's step 4, bit for bit
    for name in ("drafter/model.safetensors", "state/optimizer.safetensors"):
        a, b = load_file(ckpt_path(run, 4) / name), load_file(ckpt_path(base, 4) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_full_disk_is_said_and_leaves_no_partial_checkpoint(setup, base, tmp_path, monkeypatch, capsys):
    def disk_full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(training_state, "write_tensors", disk_full)
    with pytest.raises(DraftsmithError, match="The disk is full: checkpoint step 2 could not be saved") as info:
        train(str(setup / "recipe.yaml"), [f"run.out_dir={tmp_path}", "run.name=full"])
    assert "bytes free" in str(info.value) and "optimizer.safetensors" in str(info.value)
    run = tmp_path / "full"
    assert not list((run / "checkpoints").glob(".tmp-step-*")) and not list((run / "checkpoints").glob("step-*"))
    assert (run / ".lock").read_text() == ""
    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=full"]) == 2
    assert "disk is full" in capsys.readouterr().err
    monkeypatch.undo()

    # what an interrupted save or deletion leaves is removed at the next start
    run = copy_run(base, tmp_path)
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step-0000002", ckpts / ".tmp-step-0000005")
    shutil.copytree(ckpts / "step-0000002", ckpts / ".old-step-0000000")
    shutil.copytree(ckpts / "step-0000002", ckpts / "step-0000001")
    (ckpts / "step-0000001" / "drafter" / "model.safetensors").unlink()     # half deleted
    assert resume(setup, run)["step"] == 6
    out = capsys.readouterr().out
    assert "removed what interrupted saves left" in out and "step-0000001" in out
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000004", "step-0000006"]


# ------------------------------------------------------------------------------ symlinks

def test_export_never_follows_a_symbolic_link(setup, base, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    run = copy_run(base, tmp_path)
    newest = ckpt_path(run, 4)
    (newest / "drafter" / "notes.txt").symlink_to(secret)
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"]["drafter/notes.txt"] = secret.stat().st_size
    (newest / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="step-0000004: drafter/notes.txt is a symbolic link"):
        assert latest_checkpoint(run) == ckpt_path(run, 2)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "export"),
                 "--checkpoint", "step-0000004"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="symbolic link"):
        assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "export")]) == 0
    exported = {p.name: p for p in (tmp_path / "export").iterdir()}
    assert "notes.txt" not in exported and not any(p.is_symlink() for p in exported.values())
    assert all("hunter2" not in p.read_text(errors="ignore") for p in exported.values() if p.is_file())
    # a config.yaml that is a link is not a run's
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to(base / "config.yaml")
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "export2")]) == 2
    assert "Not a draftsmith run folder" in capsys.readouterr().err
    # the copy itself skips anything that is not a regular file
    from draftsmith.train.export import _copy_regular_files

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").symlink_to(secret)
    with pytest.warns(UserWarning, match="skips .*model.safetensors: not a regular file"):
        _copy_regular_files(src, dst)
    assert [p.name for p in dst.iterdir()] == ["config.json"]


def _npz_edit(name, **over):
    def edit(folder):
        import numpy as np

        with np.load(folder / name) as f:
            arrays = {k: f[k] for k in f.files}
        np.savez_compressed(folder / name, **{**arrays, **{k: v(arrays) for k, v in over.items()}})
    return edit


def _meta_edit(folder):
    meta = json.loads((folder / "meta.json").read_text())
    del meta["tokenizer"]
    (folder / "meta.json").write_text(json.dumps(meta))


DAMAGED_PREPARED = {
    "empty train.npz": (lambda f: (f / "train.npz").write_bytes(b""), "token file train.npz cannot be read"),
    "cut heldout.npz": (lambda f: (f / "heldout.npz").write_bytes((f / "heldout.npz").read_bytes()[:300]),
                        "token file heldout.npz cannot be read"),
    "offsets past the tokens": (_npz_edit("train.npz", offsets=lambda a: a["offsets"] * 2), "row offsets"),
    "ids outside the vocabulary": (_npz_edit("train.npz", input_ids=lambda a: a["input_ids"] | 60000),
                                   "outside the vocabulary"),
    "another preparation's rows": (lambda f: shutil.copyfile(f / "heldout.npz", f / "train.npz"),
                                   "train.npz holds other rows than its meta.json counts"),
    "binary meta.json": (lambda f: (f / "meta.json").write_bytes(b"\xff" * 40), "meta.json is not valid JSON"),
    "meta.json without tokenizer": (_meta_edit, "meta.json lacks keys"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_PREPARED))
def test_damaged_prepared_data_is_refused_by_name(setup, tmp_path, capsys, damage):
    data = tmp_path / "data"
    assert main(["data", "prepare", str(setup / "recipe.yaml"), "--out", str(data)]) == 0
    edit, needle = DAMAGED_PREPARED[damage]
    edit(data)
    capsys.readouterr()
    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=r",
                 f"data.source={data}", "train.max_steps=0"]) == 2
    err = capsys.readouterr().err
    assert "draftsmith: error:" in err and "Traceback" not in err and needle in err and str(data) in err, err


def test_a_full_disk_during_an_export_is_said_and_leaves_nothing(setup, base, tmp_path, monkeypatch, capsys):
    from draftsmith.train import export

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst / "model.safetensors"))

    monkeypatch.setattr(export, "_copy_regular_files", disk_full)
    out = tmp_path / "exports" / "hf"
    assert main(["export", str(base), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "The disk is full: the export could not be written" in err and "bytes free" in err, err
    assert "model.safetensors" in err and "Traceback" not in err
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []     # no half-written export


@pytest.mark.parametrize("fmt", ["speculators", "sglang"])
def test_serving_export_of_another_kind_says_which_kinds_each_format_takes(tmp_path, fmt):
    from draftsmith.train.export import export

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"drafter": {"kind": "small_lm"}}))
    with pytest.raises(DraftsmithError) as info:
        export(run, fmt, tmp_path / "out")
    said = str(info.value)
    assert "speculators: kinds eagle3 (P-EAGLE as its peagle type), dflash and dspark" in said
    assert "sglang: kinds eagle and eagle3" in said
    assert "small_lm" in said and "--format hf" in said


def test_a_full_disk_during_an_eval_report_is_said_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from draftsmith.eval import report as report_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "acceptance.png"))

    monkeypatch.setattr(report_module, "markdown", lambda report: "")
    monkeypatch.setattr(report_module, "plot_acceptance", full)
    with pytest.raises(DraftsmithError, match="The disk is full: the eval report could not be written") as info:
        report_module.write_report({"config": {"temperature": 0}}, [], tmp_path / "out")
    assert "bytes free" in str(info.value)
    assert not any(p.name.startswith(".partial-") for p in (tmp_path / "out").iterdir())
