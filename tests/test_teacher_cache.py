"""`draftsmith data cache` and `data.teacher: cache:DIR` on a tiny random target: a run trained on an
exact cache (k = vocabulary) matches the online run step for step, the top-k cache is the documented
approximation, the target's layers never run in a cached step, interrupted caches resume, and a cache
made for other rows, layers or another target is refused."""

import errno
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from draftsmith.cli import main
from draftsmith.distill.cache_files import FORMAT
from draftsmith.distill.teacher import expand_topk, keep_shared_parts
from draftsmith.errors import DraftsmithError
from draftsmith.train import teacher_cache
from draftsmith.train import steps
from draftsmith.train.config import load_recipe
from draftsmith.train.run import train

from conftest import tiny_llama
from tiny import make_tiny_tokenizer

WORDS = "the a cat dog runs red blue answer question capital France Paris number help code add".split()
LOSS_TOLERANCE = 1e-4
"""Online and exact-cache runs differ only by float rounding (the cache's target forward pads its rows
into other batches): their per-step losses agree to ~1e-6 here; 1e-4 leaves room across platforms."""


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """tmp/{target/ (4-layer tiny Llama), chats.jsonl, recipe.yaml}: fp32, no mixed precision."""
    root = tmp_path_factory.mktemp("cache")
    tok = make_tiny_tokenizer()
    model = tiny_llama(0, layers=4, vocab=len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    rng = random.Random(0)
    with open(root / "chats.jsonl", "w") as f:
        for _ in range(40):
            messages = []
            for turn in range(rng.randint(2, 4)):
                messages.append({"role": ("user", "assistant")[turn % 2],
                                 "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))})
            f.write(json.dumps({"messages": messages}) + "\n")
    recipe = {"description": "tiny cache test", "target": {"name": str(root / "target"), "dtype": "fp32"},
              "drafter": {"kind": "eagle3", "draft_vocab_size": 200, "ttt_steps": 2},
              "data": {"source": str(root / "chats.jsonl"), "max_length": 64, "heldout_fraction": 0.25,
                       "cache_dir": str(root / "tokenized")},
              "train": {"max_steps": 6, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "mixed_precision": "no"},
              "eval": {"every": 3, "batches": 2}, "checkpoint": {"every": 3},
              "log": {"every": 1, "tensorboard": False}, "run": {"out_dir": str(root / "runs")}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def cache(setup, out: Path, *extra: str, top_k: int = 1000) -> int:
    return main(["data", "cache", str(setup / "recipe.yaml"), *extra, "--out", str(out), "--top-k", str(top_k),
                 "--device", "cpu"])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def eagle3_cache(setup) -> Path:
    out = setup / "eagle3-cache"
    assert cache(setup, out) == 0
    return out


def test_cache_holds_the_drafters_layers_and_full_distribution(setup, eagle3_cache, capsys):
    manifest = json.loads((eagle3_cache / "manifest.json").read_text())
    plan = manifest["plan"]
    assert manifest["format"] == FORMAT and manifest["complete"] and manifest["bytes"] > 0
    assert plan["layers"] == [0, 2, 3] and plan["exact"] and plan["top_k"] == plan["arch"]["vocab_size"]
    shard = load_file(eagle3_cache / "train" / "00000.safetensors")
    train_split = plan["splits"]["train"]
    assert shard["hidden.2"].shape == (train_split["tokens"], 64) and shard["logp"].shape[0] == train_split["trained"]
    assert torch.allclose(shard["logp"].exp().sum(-1), torch.ones(1), atol=1e-5)
    # bytes per token: 3 layers x 64 x fp32 of hidden states, the full log-softmax per trained position
    assert teacher_cache.bytes_per_token(3, 64, 4, plan["top_k"], plan["arch"]["vocab_size"]) == (768, 4 * plan["top_k"])
    assert cache(setup, eagle3_cache) == 0           # a finished cache: nothing left to do
    assert "768 bytes per token of hidden states" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["eagle3", "eagle", "small_lm", "dflash", "dspark"])
def test_cache_trained_run_matches_the_online_run(setup, eagle3_cache, tmp_path, monkeypatch, kind):
    """k = vocabulary: the loss of every step and the held-out figures agree within LOSS_TOLERANCE, and
    no cached step runs the target's layers (they sit on the meta device)."""
    recipe = str(setup / "recipe.yaml")
    common = [f"run.out_dir={tmp_path}", f"drafter.kind={kind}", "drafter.num_layers=1"]
    if kind in ("dflash", "dspark"):    # block drafters tap eagle3's default layers: the same cache serves them
        common += ["drafter.block_size=4", "drafter.max_anchors=8"]
    folder = eagle3_cache
    if kind == "small_lm":           # reads no layer: a cache of log-probabilities only
        folder = tmp_path / "small-cache"
        assert cache(setup, folder, "drafter.kind=small_lm", "drafter.num_layers=1") == 0
        assert json.loads((folder / "manifest.json").read_text())["plan"]["layers"] == []
    train(recipe, [*common, "run.name=online"])
    monkeypatch.setattr(steps, "target_signals", lambda *a, **k: pytest.fail("the target ran in a cached step"))
    train(recipe, [*common, "run.name=cached", f"data.teacher=cache:{folder}"])
    online, cached = metrics(tmp_path / "online"), metrics(tmp_path / "cached")
    assert len(online) == len(cached)
    for a, b in zip(online, cached):
        for key in ("loss", "heldout_loss", "acceptance_estimate"):
            if key in a:
                assert math.isclose(a[key], b[key], rel_tol=LOSS_TOLERANCE, abs_tol=LOSS_TOLERANCE), (a["step"], key)


def test_topk_cache_is_the_documented_approximation(setup, tmp_path):
    logits = torch.randn(5, 50) * 3
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(8, dim=-1)
    rest = -torch.expm1(torch.logsumexp(top.values, -1))
    p_tilde = expand_topk(top.values, top.indices.int(), rest, 50).exp()
    assert torch.allclose(p_tilde.sum(-1), torch.ones(5), atol=1e-5)                   # a distribution
    assert torch.allclose(p_tilde.gather(1, top.indices), top.values.exp())             # top k exact
    tail = torch.ones_like(p_tilde, dtype=torch.bool).scatter_(1, top.indices, False)
    assert torch.allclose((p_tilde * tail).sum(-1), rest, atol=1e-6)                    # tail mass kept ...
    assert torch.allclose(p_tilde[tail].view(5, 42), (rest / 42)[:, None].expand(5, 42))   # ... spread evenly
    assert torch.equal(p_tilde.argmax(-1), logits.argmax(-1))
    full = logp.topk(50, dim=-1)
    assert torch.allclose(expand_topk(full.values, full.indices.int(), torch.zeros(5), 50), logp, atol=1e-6)
    # a top-k cache trains and says it is an approximation
    out = tmp_path / "top8"
    assert cache(setup, out, top_k=8) == 0
    plan = json.loads((out / "manifest.json").read_text())["plan"]
    assert not plan["exact"] and plan["top_k"] == 8
    shard = load_file(out / "train" / "00000.safetensors")
    assert shard["topk_logp"].shape[1] == 8 and shard["topk_ids"].dtype == torch.int32
    assert bool(((shard["rest"] >= 0) & (shard["rest"] <= 1)).all())
    summary = train(str(setup / "recipe.yaml"), [f"run.out_dir={tmp_path}", "run.name=top8-run", f"data.teacher=cache:{out}"])
    assert math.isfinite(summary["heldout_loss"])


def test_interrupted_cache_resumes_to_the_same_shards(setup, eagle3_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_cache, "SHARD_BYTES", 40_000)        # several shards of a few rows
    whole = tmp_path / "whole"
    assert cache(setup, whole) == 0
    names = sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
    assert len(names) > 3
    out, real, written = tmp_path / "resumed", teacher_cache._save_atomically, []

    def dying(tensors, path):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path.name)
        real(tensors, path)

    monkeypatch.setattr(teacher_cache, "_save_atomically", dying)
    with pytest.raises(KeyboardInterrupt):
        cache(setup, out)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(DraftsmithError, match="not finished"):
        train(str(setup / "recipe.yaml"), [f"run.out_dir={tmp_path}", "run.name=x", f"data.teacher=cache:{out}"])
    monkeypatch.setattr(teacher_cache, "_save_atomically", real)
    assert cache(setup, out) == 0
    assert sorted(p.relative_to(out) for p in out.rglob("*.safetensors")) == names
    for name in names:
        a, b = load_file(whole / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_for_other_rows_layers_or_plan_is_refused(setup, eagle3_cache, tmp_path, capsys):
    recipe = str(setup / "recipe.yaml")
    common = [f"run.out_dir={tmp_path}", "run.name=x", f"data.teacher=cache:{eagle3_cache}"]
    with pytest.raises(DraftsmithError, match="other train rows") as info:
        train(recipe, [*common, "data.max_length=48"])
    assert "manifest.json lists them" in str(info.value)
    small = tmp_path / "small"
    assert cache(setup, small, "drafter.kind=small_lm") == 0
    with pytest.raises(DraftsmithError, match="layers the teacher cache does not hold"):
        train(recipe, [f"run.out_dir={tmp_path}", "run.name=y", f"data.teacher=cache:{small}"])
    assert cache(setup, small, "drafter.kind=small_lm", top_k=5) == 2
    assert "another plan" in capsys.readouterr().err
    assert cache(setup, small, "drafter.kind=small_lm", "--overwrite", top_k=5) == 0      # our own folder
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cache(setup, mine, "--overwrite") == 2 and (mine / "notes.txt").is_file()
    assert "no .draftsmith marker" in capsys.readouterr().err
    with pytest.raises(DraftsmithError, match="no manifest.json"):
        train(recipe, [f"run.out_dir={tmp_path}", "run.name=z", f"data.teacher=cache:{tmp_path / 'nothing'}"])


@pytest.mark.parametrize("value", ["offline", "cached:dir", "'cache:'", "cache:"])
def test_teacher_key_is_validated(setup, value):
    with pytest.raises(DraftsmithError, match="data.teacher") as info:
        load_recipe(setup / "recipe.yaml", [f"data.teacher={value}"])
    # YAML reads a bare `cache:` as a mapping: that fails the type check instead
    assert "online, cache:DIR" in str(info.value) or "must be a string" in str(info.value)
    assert load_recipe(setup / "recipe.yaml", ["data.teacher=cache:some/dir"]).data.teacher == "cache:some/dir"


def test_keep_shared_parts_frees_the_layers(setup):
    from draftsmith.models.target import load_target

    target = load_target(str(setup / "target"), "fp32", device="cpu")
    embed = target.model.get_input_embeddings().weight
    keep_shared_parts(target, torch.device("cpu"))
    assert all(p.is_meta for p in target.model.model.layers.parameters())
    assert not any(p.is_meta for name, p in target.model.named_parameters() if ".layers." not in name)
    assert target.model.get_input_embeddings().weight is embed


def _rewrite_shard(folder: Path, rel: str, edit) -> None:
    """A crafted shard: `edit` changes its tensors, and its size and sha256 in the manifest follow (so only
    the checks on its contents can catch it)."""
    from safetensors.torch import save_file

    from draftsmith.folders import sha256_of

    tensors = load_file(folder / rel)
    edit(tensors)
    save_file(tensors, str(folder / rel))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][rel], manifest["sha256"][rel] = (folder / rel).stat().st_size, sha256_of(folder / rel)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _shift_offsets(t):
    t["token_offsets"][1] += 3           # row 0 reads 3 tokens of row 1


SHARD = "train/00000.safetensors"
DAMAGE = {
    "crafted offsets": (lambda f: _rewrite_shard(f, SHARD, _shift_offsets), "token_offsets that are not its rows'"),
    "all zeros": (lambda f: (f / SHARD).write_bytes(bytes((f / SHARD).stat().st_size)), "does not match its sha256"),
    "truncated": (lambda f: (f / SHARD).write_bytes((f / SHARD).read_bytes()[:1000]), "(truncated or replaced)"),
    "missing": (lambda f: (f / "heldout" / "00000.safetensors").unlink(), "heldout/00000.safetensors is missing"),
    "extra tensor": (lambda f: _rewrite_shard(f, SHARD, lambda t: t.update(x=torch.zeros(1))), "other tensors"),
    "no splits": (lambda f: _edit_manifest(f, lambda m: m["plan"].pop("splits")), "manifest.json is damaged"),
    "cut manifest": (lambda f: (f / "manifest.json").write_text((f / "manifest.json").read_text()[:300]),
                     "manifest.json is not valid JSON"),
    "unhashed (old)": (lambda f: _edit_manifest(f, lambda m: m.pop("sha256")), "before draftsmith hashed its shards"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_is_refused_with_the_shard_named(setup, eagle3_cache, tmp_path, damage):
    import shutil

    folder = tmp_path / "cache"
    shutil.copytree(eagle3_cache, folder)
    edit, needle = DAMAGE[damage]
    edit(folder)
    with pytest.raises(DraftsmithError) as info:
        train(str(setup / "recipe.yaml"), [f"run.out_dir={tmp_path}", "run.name=x", f"data.teacher=cache:{folder}"])
    assert needle in str(info.value) and "--overwrite" in str(info.value), str(info.value)
    assert not (tmp_path / "x" / "checkpoints").exists() or not any((tmp_path / "x" / "checkpoints").iterdir())


def test_topk_cache_with_ids_outside_the_vocabulary_is_refused(setup, tmp_path):
    folder = tmp_path / "topk"
    assert cache(setup, folder, "drafter.kind=small_lm", "drafter.num_layers=1", top_k=5) == 0
    assert set(json.loads((folder / "manifest.json").read_text())["sha256"]) == {SHARD, "heldout/00000.safetensors"}
    _rewrite_shard(folder, SHARD, lambda t: t["topk_ids"].__setitem__((0, 0), 1 << 20))
    with pytest.raises(DraftsmithError, match=f"shard {SHARD} has token ids outside the vocabulary"):
        train(str(setup / "recipe.yaml"), [f"run.out_dir={tmp_path}", "run.name=x", "drafter.kind=small_lm",
                                           "drafter.num_layers=1", f"data.teacher=cache:{folder}"])


def test_a_full_disk_during_data_cache_is_said(setup, tmp_path, monkeypatch, capsys):
    def disk_full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(teacher_cache, "_save_atomically", disk_full)
    out = tmp_path / "full"
    assert cache(setup, out) == 2
    err = capsys.readouterr().err
    assert "The disk is full: teacher-cache shard train/00000.safetensors could not be written" in err, err
    assert "bytes free" in err and "Traceback" not in err
    assert not json.loads((out / "manifest.json").read_text())["complete"]
