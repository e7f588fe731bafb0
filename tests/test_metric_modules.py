"""draftsmith's `evaluate` modules (metric_modules/): a hand-computed case, `evaluate.load` offline from a
fresh cache without draftsmith importable, and a recorded run's report reproduced from its files."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from draftsmith.cli import main
from draftsmith.metric_modules import METRICS_DIR

from conftest import tiny_llama
from tiny import make_tiny_tokenizer

NAMES = ("acceptance", "speedup")
DRAFTER = "truncated:1"   # the target's first layer: accepts some drafts and rejects others
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
# the main job's recorded run (README: 1.21x)
RECORDED = Path(__file__).resolve().parents[1] / "bench/results/cpu-main-fresh-clone-eagle3-cpu/a46d58c/report.json"

# two requests; EOS cut the second's last step short (emitted 1, not accepted + 1)
HAND = dict(accepted=[[2, 0, 3], [1, 1]], proposed=[[3, 3, 3], [2, 2]], emitted=[[3, 1, 4], [2, 1]])
HAND_FIGURES = {
    "tau": 11 / 5,                                       # 3+1+4+2+1 tokens over 5 steps
    "tau_per_request_mean": (8 / 3 + 3 / 2) / 2,
    "tau_per_request": [8 / 3, 3 / 2],
    "acceptance_rate": 7 / 13,
    "acceptance_by_position": [4 / 5, 2 / 4, 2 / 4],    # α3: 2 steps drafted depth 3 with ≥ 2 accepted, 1 took it
    "accepted_length_histogram": [1, 2, 1, 1],
    "steps": 5,
    "nodes_per_step": 13 / 5,
}


def assert_hand_figures(figures: dict) -> None:
    assert figures.keys() == HAND_FIGURES.keys()
    for key, value in HAND_FIGURES.items():
        assert figures[key] == pytest.approx(value), key


@pytest.fixture(scope="module")
def modules():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        import evaluate   # heavy (datasets, pyarrow): loaded only when these tests run

        yield {name: evaluate.load(str(METRICS_DIR / name), keep_in_memory=True) for name in NAMES}


def test_acceptance_module_agrees_with_a_hand_computed_case(modules):
    figures = modules["acceptance"].compute(**HAND, k=3)
    assert_hand_figures(figures)
    modules["acceptance"].add(**{key: v[0] for key, v in HAND.items()})        # added piecewise: the same figures
    modules["acceptance"].add_batch(**{key: v[1:] for key, v in HAND.items()})
    assert modules["acceptance"].compute(k=3) == figures
    # depth and emitted default to a chain's: depth = proposed, emitted = accepted + 1
    chain = modules["acceptance"].compute(accepted=[[2, 0]], proposed=[[2, 2]])
    assert chain["tau"] == 2.0 and chain["acceptance_by_position"] == [0.5, 1.0]
    # a tree: α follows the drafted depth, not the node count; a depth no step reached is None
    tree = modules["acceptance"].compute(accepted=[[2]], proposed=[[6]], depth=[[2]], k=3)
    assert tree["acceptance_by_position"] == [1.0, 1.0, None] and tree["acceptance_rate"] == 2 / 6
    assert tree["accepted_length_histogram"] == [0, 0, 1, 0] and tree["nodes_per_step"] == 6.0


def test_speedup_module_agrees_with_a_hand_computed_case(modules):
    # sampling: the decoders emit different token counts, so speedup is a ratio of rates, not of times
    figures = modules["speedup"].compute(ar_tokens=[10, 20], ar_s=[1.0, 1.0], sd_tokens=[20, 20], sd_s=[1.0, 1.0])
    assert figures == pytest.approx({"speedup": 20 / 15, "ar_tokens_per_s": 15.0, "sd_tokens_per_s": 20.0})


def test_modules_say_mismatched_counts_in_words(modules):
    with pytest.raises(ValueError, match="3 accepted counts but 2 proposed counts"):
        modules["acceptance"].compute(accepted=[[1, 1, 1]], proposed=[[2, 2]])


def test_module_files_import_only_what_evaluate_can_resolve():
    """evaluate copies a module and its relative imports into its cache; draftsmith must not be needed."""
    for name in NAMES:
        for path in (METRICS_DIR / name).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    roots = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    roots = [] if node.level else [node.module.split(".")[0]]
                else:
                    continue
                assert set(roots) <= {"__future__", "collections", "datasets", "evaluate"}, (path, roots)
        assert (METRICS_DIR / name / "README.md").read_text().startswith("---\ntitle:")   # the metric card


def test_evaluate_load_works_offline_from_a_fresh_copy(tmp_path):
    """A fresh clone's folders, a fresh HF cache, no network, and draftsmith not importable."""
    for name in NAMES:
        shutil.copytree(METRICS_DIR / name, tmp_path / "clone" / name, ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import json, sys\n"
        "sys.modules['draftsmith'] = None\n"                     # any import of draftsmith now fails
        "import evaluate\n"
        f"acceptance = evaluate.load({str(tmp_path / 'clone' / 'acceptance')!r})\n"
        f"speedup = evaluate.load({str(tmp_path / 'clone' / 'speedup')!r})\n"
        f"print(json.dumps([acceptance.compute(**{HAND!r}, k=3), "
        "speedup.compute(ar_tokens=[100, 50], ar_s=[2.0, 1.0], sd_tokens=[100, 50], sd_s=[1.0, 0.5])]))\n")
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    acceptance, speedup = json.loads(done.stdout.strip().splitlines()[-1])
    assert_hand_figures(acceptance)
    assert speedup == {"speedup": 2.0, "ar_tokens_per_s": 50.0, "sd_tokens_per_s": 100.0}
    assert list((tmp_path / "modules" / "evaluate_modules" / "metrics").glob("acceptance/*/acceptance_figures.py"))


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = make_tiny_tokenizer()
    model = tiny_llama(0, layers=2, vocab=len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    (root / "bench.jsonl").write_text('{"prompt": "Hello! How can I help you today?"}\n'
                                      '{"prompt": "What is the capital of France?"}\n'
                                      '{"prompt": "Count from one to twenty."}\n')
    return root


@pytest.mark.parametrize("shape", [["--k", 3], ["--tree", "dynamic:3,2,6"]], ids=["chain", "tree"])
def test_modules_reproduce_a_recorded_eval_report(modules, tiny_target, tmp_path, shape):
    """A run's outputs.jsonl keeps every step's counts: the modules give report.json's figures exactly."""
    out = tmp_path / "report"
    assert main(["eval", "--target", str(tiny_target / "target"), "--drafter", DRAFTER,
                 "--bench", str(tiny_target / "bench.jsonl"), "--max-new-tokens", "12",
                 *map(str, shape), "--device", "cpu", "--no-hf-assisted", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(records) == report["num_prompts"] == 3 and sum(map(sum, (r["accepted"] for r in records))) > 0
    acceptance = modules["acceptance"].compute(
        accepted=[r["accepted"] for r in records], proposed=[r["proposed"] for r in records],
        depth=[r["depth"] for r in records], emitted=[r["emitted"] for r in records], k=report["draft_length"]["depth"])
    for key in ("tau", "tau_per_request_mean", "acceptance_rate", "acceptance_by_position",
                "accepted_length_histogram", "steps", "nodes_per_step"):
        assert acceptance[key] == report[key], key
    assert acceptance["tau_per_request"] == [row["tau"] for row in report["prompts"]]
    speedup = modules["speedup"].compute(
        ar_tokens=[len(r["ar_tokens"]) for r in records], ar_s=[r["ar_s"] for r in records],
        sd_tokens=[len(r["sd_tokens"]) for r in records], sd_s=[r["sd_s"] for r in records])
    assert speedup == {key: report[key] for key in ("speedup", "ar_tokens_per_s", "sd_tokens_per_s")}
    if shape[0] == "--tree":   # the tree case exercises depth apart from node counts
        assert any(d != p for r in records for d, p in zip(r["depth"], r["proposed"]))


def test_speedup_module_reproduces_the_main_jobs_recorded_report(modules):
    """The main job's 1.21x (README.md, docs/recipes.md): bench/results keeps per-prompt timings, not per-step
    counts, so the speedup figures come back exactly and the acceptance ones need a run of their own (above)."""
    report = json.loads(RECORDED.read_text())
    rows = report["prompts"]
    speedup = modules["speedup"].compute(ar_tokens=[r["ar_new_tokens"] for r in rows], ar_s=[r["ar_s"] for r in rows],
                                         sd_tokens=[r["new_tokens"] for r in rows], sd_s=[r["sd_s"] for r in rows])
    assert speedup == {key: report[key] for key in ("speedup", "ar_tokens_per_s", "sd_tokens_per_s")}
    assert round(speedup["speedup"], 2) == 1.21     # the figure README.md quotes
