"""Hostile and mistaken inputs get clear errors through the real CLI (exit 2: what, the value seen,
what to do), never a traceback (issue 9): binary bench and data files, a mistyped target, a device
that is not there, a recipe that is not YAML, broken drafter folders, a drafter sized to exhaust
memory, a too-long prompt late in a benchmark, mostly malformed training data, and SIGTERM / Ctrl-C
during the first eval prompt."""

import json
import os
import shutil
import signal
import time

import pytest
import torch
import yaml

from draftsmith.cli import main
from draftsmith.eval import harness
from draftsmith.models.eagle import EagleHead, build_eagle
from draftsmith.models.eagle3 import build_eagle3

from conftest import tiny_llama
from tiny import make_tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """target/ (2 layers, 64 positions), eagle/ and eagle3/ heads for it, bench.jsonl, chats.jsonl."""
    root = tmp_path_factory.mktemp("safety")
    tok = make_tiny_tokenizer()
    target = tiny_llama(0, layers=2, vocab=len(tok), max_positions=64)
    target.config.eos_token_id = tok.eos_token_id
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    build_eagle(target, 1.0).save_pretrained(root / "eagle")
    (root / "bench.jsonl").write_text('{"prompt": "Hello! How can I help you today?"}\n'
                                      '{"prompt": "What is the capital of France?"}\n')
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(30)]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root


def eval_args(root, out, **flags) -> list[str]:
    args = {"--target": root / "target", "--drafter": "prompt-lookup", "--bench": root / "bench.jsonl",
            "--max-new-tokens": 8, "--k": 2, "--device": "cpu", "--out": out, **flags}
    return ["eval", *[str(x) for kv in args.items() for x in kv], "--no-hf-assisted"]


def clear_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "draftsmith: error:" in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ------------------------------------------------------------------------------- A: clear errors

def test_binary_bench_file(root, tmp_path, capsys):
    (tmp_path / "b.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00" * 50)
    assert main(eval_args(root, tmp_path / "out", **{"--bench": tmp_path / "b.jsonl"})) == 2
    clear_error(capsys, "not UTF-8 text", "line 1")
    assert not (tmp_path / "out").exists()


def test_mistyped_target_is_not_looked_up_as_a_hub_model(root, tmp_path, capsys):
    assert main(eval_args(root, tmp_path / "out", **{"--target": "smolm2-135m-instruct"})) == 2
    clear_error(capsys, "neither an asset name, a folder, a .gguf file nor a reachable hub id",
                "Did you mean smollm2-135m-instruct?", "gemma3-270m")


@pytest.mark.parametrize("device", ["tpu", "cuda", "cuda:7", "mps"])
def test_device_that_is_not_here(root, tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert main(eval_args(root, tmp_path / "out", **{"--device": device})) == 2
    clear_error(capsys, device, "Use one of: cpu")


@pytest.mark.parametrize("content,needle", [
    (b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 20, "not UTF-8 text"),
    (b"print('hello')\n", "must be a YAML mapping"),
    (b"[1, 2, 3]\n", "must be a YAML mapping"),
    (b"target: {name: x\n  bad", "not valid YAML"),
])
def test_recipe_that_is_not_a_yaml_recipe(tmp_path, capsys, content, needle):
    (tmp_path / "r.yaml").write_bytes(content)
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    clear_error(capsys, needle)


@pytest.mark.parametrize("edit,needle", [
    (lambda raw: "{not json", "config.json is not valid JSON"),
    (lambda raw: b"\xff\xfe\x00binary", "config.json is not valid JSON"),
    (lambda raw: json.dumps([1, 2]), "must hold a JSON object"),
    (lambda raw: json.dumps({**raw, "hiden_size": 64}), "Unknown key in the drafter's config.json"),
    (lambda raw: json.dumps({k: v for k, v in raw.items() if k != "head_dim"}), "lacks required keys"),
    (lambda raw: json.dumps({**raw, "num_attention_heads": "four"}), "Invalid num_attention_heads"),
])
def test_broken_drafter_config(root, tmp_path, capsys, edit, needle):
    folder = tmp_path / "drafter"
    shutil.copytree(root / "eagle", folder)
    text = edit(json.loads((folder / "config.json").read_text()))
    (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(eval_args(root, tmp_path / "out", **{"--drafter": folder})) == 2
    clear_error(capsys, needle)


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_interrupt_during_the_first_prompt_reports_zero_prompts(root, tmp_path, capsys, monkeypatch, how):
    def interrupted_warm_up(self, prompt):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)   # the harness turns it into KeyboardInterrupt
            time.sleep(5)
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.Runner, "warm_up", interrupted_warm_up)
    assert main(eval_args(root, tmp_path / "out")) == 130
    err = capsys.readouterr().err
    assert "interrupted before the first prompt finished: 0 prompts done, no report written" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "report.json").exists()


# ------------------------------------------------------------------------- B: prompt lengths

def test_too_long_prompt_is_refused_before_any_prompt_runs(root, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(harness.Runner, "run_prompt", lambda self, *a, **k: calls.append(1))
    bench = tmp_path / "b.jsonl"
    bench.write_text('{"prompt": "Hi"}\n{"prompt": "Hello"}\n' + json.dumps({"prompt": "word " * 80, "id": "long"}))
    assert main(eval_args(root, tmp_path / "out", **{"--bench": bench})) == 2
    clear_error(capsys, "1 prompt(s) do not fit the target's context of 64 tokens", "prompt 3 (id 'long', turn 1)",
                "nothing was generated")
    assert calls == []


# ------------------------------------------------------------------------ C: training data rows

def write_recipe(root, tmp_path, source) -> str:
    recipe = {"description": "tiny", "target": {"name": str(root / "target"), "dtype": "fp32"},
              "drafter": {"kind": "small_lm", "num_layers": 1},
              "data": {"source": str(source), "max_length": 48, "heldout_fraction": 0.2,
                       "cache_dir": str(tmp_path / "cache")},
              "train": {"max_steps": 0, "batch_size": 2, "mixed_precision": "no"},
              "eval": {"batches": 1}, "log": {"tensorboard": False}, "run": {"out_dir": str(tmp_path / "runs")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "r.yaml")


def test_binary_data_file(root, tmp_path, capsys):
    (tmp_path / "data.jsonl").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe" * 40 + b"\n" + b"\x80\x81\n" * 5)
    assert main(["train", write_recipe(root, tmp_path, tmp_path / "data.jsonl")]) == 2
    clear_error(capsys, "6 of 6 records", "not UTF-8 text", "no usable conversation")


def test_malformed_rows_are_counted_and_refused_over_the_limit(root, tmp_path, capsys):
    good = (root / "chats.jsonl").read_text().splitlines()
    bad = [json.dumps({"messages": [{"role": "bing", "content": "q"}]})] * 20 + ["{oops"] * 10
    (tmp_path / "data.jsonl").write_text("\n".join(good + bad) + "\n")
    recipe = write_recipe(root, tmp_path, tmp_path / "data.jsonl")
    assert main(["train", recipe]) == 2
    err = clear_error(capsys, "30 of 60 records", "50.0% > data.max_malformed_fraction 0.1")
    assert "unknown role 'bing': 20" in err and "not JSON: 10" in err
    assert main(["train", recipe, "data.max_malformed_fraction=0.5"]) == 0
    out = capsys.readouterr().out
    assert "kept 30, skipped 30 (unknown role 'bing': 20, not JSON: 10)" in out
    assert "tokenized conversations: kept" in out     # the second stage's counts are printed too


@pytest.mark.parametrize("value,needle", [("1.5", "Use a fraction in [0, 1]"), ("-0.1", "Use a value >= 0.0"),
                                          ("many", "must be a number")])
def test_max_malformed_fraction_is_validated(value, needle, capsys):
    assert main(["train", "smollm2-135m/small_lm-kd-quick", f"data.max_malformed_fraction={value}", "--dry-run"]) == 2
    clear_error(capsys, "data.max_malformed_fraction", needle)


# ------------------------------------------------------------- D: drafter sizes checked first

@pytest.fixture
def no_real_heads(monkeypatch):
    """Fail the test if an EAGLE head is built off the meta device with more than the target's width:
    that is the allocation the checks must prevent (65536 wide would be 64 GiB)."""
    real = EagleHead.__init__

    def guarded(self, config):
        if torch.empty(0).device.type != "meta" and config.hidden_size > 64:
            raise AssertionError(f"a {config.hidden_size}-wide head was allocated before any check")
        real(self, config)

    monkeypatch.setattr(EagleHead, "__init__", guarded)


@pytest.mark.parametrize("edit,needle", [
    ({"hidden_size": 65536}, "hidden_size differs from the target's hidden size"),
    ({"hidden_size": 65536, "intermediate_size": 1 << 20}, "hidden_size differs"),
    ({"vocab_size": 1 << 24}, "vocabulary (vocab_size) differs"),
    ({"target_layer": 40}, "reads target layers this target does not have"),
    ({"intermediate_size": 4096}, "weights do not match its config.json"),
])
def test_oversized_or_mismatched_eagle_config_is_refused_before_allocation(root, tmp_path, capsys, no_real_heads,
                                                                            edit, needle):
    folder = tmp_path / "drafter"
    shutil.copytree(root / "eagle", folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **edit}))
    assert main(eval_args(root, tmp_path / "out", **{"--drafter": folder})) == 2
    clear_error(capsys, needle)


def test_damaged_weights_are_refused_from_the_header(root, tmp_path, capsys):
    folder = tmp_path / "drafter"
    shutil.copytree(root / "eagle", folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])   # cut mid-tensor
    assert main(eval_args(root, tmp_path / "out", **{"--drafter": folder})) == 2
    clear_error(capsys, "weights file is damaged")
    (folder / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")   # absurd header size
    assert main(eval_args(root, tmp_path / "out", **{"--drafter": folder})) == 2
    clear_error(capsys, "weights file is damaged", "header claims")


def test_eagle3_head_reading_layers_the_target_lacks(root, tmp_path, capsys):
    vocab = json.loads((root / "target" / "config.json").read_text())["vocab_size"]
    head = build_eagle3(tiny_llama(0, layers=4, vocab=vocab), [0, 1, 3], torch.arange(50))   # a 4-layer target's
    head.save_pretrained(tmp_path / "e3")
    assert main(eval_args(root, tmp_path / "out", **{"--drafter": tmp_path / "e3"})) == 2
    clear_error(capsys, "reads target layers this target does not have", "[0, 1, 3]")


@pytest.mark.parametrize("edit,needle", [
    ({"num_hidden_layers": 64}, "num_hidden_layers exceeds the target's"),
    ({"hidden_size": 65536}, "hidden_size exceeds the target's"),
    ({"intermediate_size": 96}, "weights do not match its config.json"),
])
def test_small_lm_config_checked_before_allocation(root, tmp_path, capsys, monkeypatch, edit, needle):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(1, layers=1, vocab=json.loads((root / "target" / "config.json").read_text())["vocab_size"])
    model.save_pretrained(tmp_path / "lm")
    raw = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**raw, **edit}))
    real = AutoModelForCausalLM.from_pretrained

    def guarded(path, *args, **kwargs):
        assert str(path) != str(tmp_path / "lm"), "the drafter was loaded before its config was checked"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", guarded)
    assert main(eval_args(root, tmp_path / "out", **{"--drafter": tmp_path / "lm"})) == 2
    clear_error(capsys, needle)


def _parallel_folder(root, folder):
    """A parallel (PARD) drafter for the module's target, saved as export --format hf writes it."""
    import types

    from transformers import AutoModelForCausalLM

    from draftsmith.models.parallel import build_parallel

    target = AutoModelForCausalLM.from_pretrained(root / "target")
    spec = types.SimpleNamespace(init_from=None, num_layers=1, hidden_size=None, intermediate_size=None,
                                 init="target", layers_from_target=[0], parallel_k=3)
    build_parallel(target, spec).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("edit,needle", [
    ({"hidden_size": 65536}, "hidden_size exceeds the target's"),
    ({"num_hidden_layers": 64}, "num_hidden_layers exceeds the target's"),
    ({"intermediate_size": 96}, "weights do not match its config.json"),
    ({"vocab_size": 1 << 24}, "mask token must be the one row after"),
    ({"draftsmith_mask_token_id": "x"}, "Invalid draftsmith_mask_token_id"),
    ({"draftsmith_parallel_k": 0}, "Invalid draftsmith_parallel_k"),
    ({"draftsmith_target_vocab_size": 7}, "trained for another vocabulary"),
    ({"model_type": "no-such-model"}, "not a transformers model config"),
])
def test_parallel_drafter_folder_checked_before_allocation(root, tmp_path, capsys, monkeypatch, edit, needle):
    from transformers import AutoModelForCausalLM

    folder = _parallel_folder(root, tmp_path / "par")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **edit}))
    real = AutoModelForCausalLM.from_pretrained

    def guarded(path, *args, **kwargs):
        assert str(path) != str(folder), "the drafter was loaded before its config was checked"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", guarded)
    assert main(eval_args(root, tmp_path / "out", **{"--drafter": folder})) == 2
    clear_error(capsys, needle)


def test_parallel_drafter_with_damaged_weights(root, tmp_path, capsys):
    from draftsmith.models import load_drafter, load_target
    from draftsmith.models.parallel import ParallelProposer

    folder = _parallel_folder(root, tmp_path / "par")
    assert isinstance(load_drafter(str(folder), load_target(str(root / "target"), "fp32", device="cpu")),
                      ParallelProposer)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])   # cut mid-tensor
    assert main(eval_args(root, tmp_path / "out", **{"--drafter": folder})) == 2
    clear_error(capsys, "weights file is damaged")


# --------------------------------------------- D: settings accepted and then ignored (issue 21)

def test_k_max_below_one_is_refused(root, tmp_path, capsys):
    """--k auto --k-max 0 drafted nothing and still reported tau 1.0 and a speedup."""
    assert main(eval_args(root, tmp_path / "out", **{"--k": "auto", "--k-max": 0})) == 2
    clear_error(capsys, "--k-max", "must be an integer >= 1", "(got: 0)", "--k-max 8")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "inf"),
                                        ("--temperature", "-0.5"), ("--top-p", "nan"), ("--top-p", "1.5")])
def test_regenerate_refuses_non_finite_or_out_of_range_sampling(root, tmp_path, capsys, flag, value):
    """--temperature nan ran greedy and wrote NaN into the manifest."""
    assert main(["data", "regenerate", "--target", str(root / "target"), "--source", str(root / "chats.jsonl"),
                 "--out", str(tmp_path / "regen"), flag, value]) == 2
    clear_error(capsys, "invalid sampling", "finite --temperature >= 0", "--top-p in (0, 1]")
    assert not (tmp_path / "regen").exists()


@pytest.mark.parametrize("url,needle", [("http://[::1", "Invalid IPv6 URL"), ("http://localhost:99999", "Port"),
                                        ("http://:8000", "names no host")])
def test_malformed_endpoint_url_is_a_clear_error(root, tmp_path, capsys, url, needle):
    assert main(["data", "regenerate", "--target", str(root / "target"), "--source", str(root / "chats.jsonl"),
                 "--out", str(tmp_path / "regen"), "--endpoint", url, "--retries", "0"]) == 2
    clear_error(capsys, "--endpoint", needle, url, "http://localhost:8000")


@pytest.mark.parametrize("content,needle", [
    ("[]", "holds no list of rank paths"), ("{}", "holds no list of rank paths"),
    ("[[0], [0.9]]", "non-negative integer ranks"), ("[[0], [1.7]]", "non-negative integer ranks"),
    ("[[true]]", "non-negative integer ranks"),
])
def test_bad_static_tree_file_is_a_clear_error(root, tmp_path, capsys, content, needle):
    (tmp_path / "tree.json").write_text(content)
    assert main(eval_args(root, tmp_path / "out", **{"--tree": f"static:{tmp_path / 'tree.json'}"})) == 2
    clear_error(capsys, needle, "[[0], [1], [0, 0]]")


@pytest.mark.parametrize("flags,seen", [
    ({"--tree": "dynamic:1000000,1000000,1000000"}, "at most 1024 nodes and drafts at most 16384"),
    ({"--tree": "dynamic:100,1,8"}, "does not fit the target's context of 64 tokens"),
    ({"--tree": "dynamic:4,4,63"}, "does not fit the target's context of 64 tokens"),
    ({"--k": 1000}, "does not fit the target's context of 64 tokens"),
    ({"--k": "auto", "--k-max": 63}, "--k auto --k-max 63: depth 63"),
])
def test_draft_sizes_beyond_what_a_step_can_hold_are_refused(root, tmp_path, capsys, flags, seen):
    """dynamic:1000000,... tried to allocate ~21 GB of draft logits; a draft deeper or wider than the
    target's context could never be verified."""
    assert main(eval_args(root, tmp_path / "out", **flags)) == 2
    clear_error(capsys, seen)
    assert not (tmp_path / "out").exists()


def test_a_gguf_whose_weights_do_not_convert_is_refused_and_no_folder_is_left(tmp_path, monkeypatch):
    """models/target.py `gguf_to_folder`: weights transformers loaded in a form the plain model cannot take (packed
    GGUF layers) left the plain model's own random weights behind without a word (load_state_dict(strict=False));
    now the conversion is refused and nothing is cached. It asks transformers to unpack the weights."""
    from draftsmith.errors import DraftsmithError
    from draftsmith.models import target as target_module

    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    asked = []

    class Packed(torch.nn.Module):        # stands in for a model whose linears stayed GGUF-packed
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama(0)
            self.config = self.inner.config

        def state_dict(self, *a, **k):
            return {k: v for k, v in self.inner.state_dict().items() if "q_proj" not in k}

    monkeypatch.setattr(target_module.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: asked.append(k) or Packed())
    with pytest.raises(DraftsmithError, match="did not convert") as err:
        target_module.gguf_to_folder(tmp_path / "m.gguf")
    assert "q_proj" in str(err.value)
    assert not list((tmp_path / "cache").rglob("config.json"))
    if hasattr(__import__("transformers"), "GgufConfig"):
        assert asked[0]["quantization_config"].dequantize is True


def test_a_converted_target_is_found_by_its_content_after_a_reinstall(tmp_path, monkeypatch, capsys):
    """The conversion cache was keyed by the GGUF's path and mtime, so every fresh install of the asset package (a
    new venv, a new mtime) converted the same 98 MB file again into another 538 MB folder. Now the key is the file's
    content: the same bytes elsewhere find the folder; other bytes of the same name convert, naming the folder left."""
    from draftsmith.models import target as target_module

    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path / "cache"))
    first, again, other = (tmp_path / d / "m.gguf" for d in ("venv1", "venv2", "venv3"))
    for path, data in ((first, b"GGUF one"), (again, b"GGUF one"), (other, b"GGUF two")):
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(again, ns=(1, 1))
    folder = target_module.cache_folder(first)
    assert folder.parent == tmp_path / "cache" / "targets" and folder.name.startswith("m-")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(target_module.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert target_module.gguf_to_folder(again) == folder
    assert target_module.cache_folder(other) != folder
    with pytest.raises(AssertionError, match="converted again"):
        target_module.gguf_to_folder(other)
    said = capsys.readouterr().out
    assert "also holds 1 conversion(s) of other m.gguf files" in said and folder.name in said
    assert (folder / "config.json").exists()
