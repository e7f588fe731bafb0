"""`draftsmith data regenerate` on a tiny random target: turn-by-turn answers from the built-in engine
and from a real `transformers serve` process, truncation marks, resumption after a crash or SIGKILL
without duplicates, clear errors for unreachable or wrong servers, and the folder as training data."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from draftsmith.cli import main
from draftsmith.distill import regenerate as regen
from draftsmith.distill.regenerate import Dialogue, RegenerateConfig, regenerate
from draftsmith.errors import DraftsmithError

from conftest import tiny_llama
from tiny import make_tiny_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WORDS = "the a cat dog runs red blue answer question capital France Paris number help code add".split()
END_AFTER = 58
"""The tiny target's greedy answers pass through this token within ~8 tokens: its LM-head row is
swapped with <|im_end|>'s, so the random model ends its turns and multi-turn conversations go on."""


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """tmp/{target/, chats.jsonl (12 conversations of 1-3 user turns), recipe.yaml}."""
    root = tmp_path_factory.mktemp("regen")
    tok = make_tiny_tokenizer()
    model = tiny_llama(0, vocab=len(tok))
    with torch.no_grad():
        w = model.lm_head.weight
        w[[tok.eos_token_id, END_AFTER]] = w[[END_AFTER, tok.eos_token_id]]
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    rng = random.Random(0)
    with open(root / "chats.jsonl", "w") as f:
        for i in range(12):
            messages = [{"role": "system", "content": "Answer briefly."}] if i % 4 == 0 else []
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))})
                messages.append({"role": "assistant", "content": "an answer written by another model"})
            if i == 5:      # two source answers in a row: the target answers once
                messages.append({"role": "assistant", "content": "and more"})
            f.write(json.dumps({"id": f"c{i}", "messages": messages}) + "\n")
    recipe = {"description": "tiny regenerated data", "target": {"name": str(root / "target"), "dtype": "fp32"},
              "drafter": {"kind": "small_lm", "num_layers": 1},
              "data": {"source": str(root / "chats.jsonl"), "max_length": 64, "heldout_fraction": 0.3,
                       "cache_dir": str(root / "cache")},
              "train": {"max_steps": 2, "batch_size": 2, "mixed_precision": "no"},
              "log": {"tensorboard": False}, "run": {"out_dir": str(root / "runs")}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def args(setup: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "regenerate", "--target", str(setup / "target"), "--source", str(setup / "chats.jsonl"),
            "--out", str(out), "--max-new-tokens", "32", "--device", "cpu", *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "conversations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def builtin(setup) -> Path:
    """One uninterrupted built-in run (batches of 3, shards of 4); tests only read it."""
    out = setup / "builtin"
    assert main(args(setup, out, "--batch-size", "3", "--shard-size", "4")) == 0
    return out


def greedy_answer(model, tok, messages: list[dict], max_new_tokens: int = 32) -> tuple[str, bool]:
    """The target's own greedy answer, one sequence, no padding: what a batched left-padded call must give."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    ended = tok.eos_token_id in out
    return tok.decode(out[: out.index(tok.eos_token_id)] if ended else out, skip_special_tokens=True), not ended


def test_builtin_answers_every_turn_conditioned_on_its_own_answers(setup, builtin):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((builtin / "manifest.json").read_text())
    assert manifest["complete"] and manifest["format"] == regen.FORMAT
    assert manifest["plan"]["shards"] == 3 and manifest["engines"]["builtin"]["batch_size"] == 3
    assert manifest["plan"]["sampling"] == {"temperature": 0.0, "top_p": 1.0, "seed": 0}
    assert {"torch", "transformers", "draftsmith"} <= set(manifest["versions"])
    got = records(builtin)
    sources = [json.loads(line) for line in (setup / "chats.jsonl").read_text().splitlines()]
    assert [r["id"] for r in got] == [s["id"] for s in sources]
    model = AutoModelForCausalLM.from_pretrained(setup / "target").eval()
    tok = AutoTokenizer.from_pretrained(setup / "target")
    multi_turn = 0
    for record, src in zip(got, sources):
        turns = record["conversations"]
        asked = [m for m in src["messages"] if m["role"] != "assistant"]
        roles = [t["from"] for t in turns]
        assert roles[-1] == "gpt" and "gpt" not in roles[:1]
        mine = [t["value"] for t in turns if t["from"] != "gpt"]
        assert mine == [m["content"] for m in asked][: len(mine)]
        # replay: each answer is the target's greedy answer given the regenerated history before it
        history = []
        for i, t in enumerate(turns):
            role = {"human": "user", "gpt": "assistant", "system": "system"}[t["from"]]
            if role == "assistant":
                text, cut = greedy_answer(model, tok, history)
                assert t["value"] == text and t["value"] != "an answer written by another model"
                assert cut == (record["truncated"] and i == len(turns) - 1)
            history.append({"role": role, "content": t["value"]})
        multi_turn += roles.count("gpt") > 1
    assert multi_turn >= 3
    counts = manifest["counts"]
    assert counts["conversations"] == 12 and counts["new_tokens"] > 0 and counts["new_tokens_per_s"] > 0
    assert counts["truncated"] == sum(r["truncated"] for r in got)


def test_truncated_answers_are_marked_and_end_the_conversation(setup, tmp_path):
    out = tmp_path / "short"
    assert main(args(setup, out, "--max-new-tokens", "2", "--max-conversations", "5")) == 0
    got = records(out)
    assert len(got) == 5 and all(r["truncated"] for r in got)
    assert all([t["from"] for t in r["conversations"]].count("gpt") == 1 for r in got)
    assert json.loads((out / "manifest.json").read_text())["counts"]["truncated"] == 5


def test_dialogue_turn_logic():
    d = Dialogue(id="x", source=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"},
                                 {"role": "assistant", "content": "A2"}, {"role": "user", "content": "b"},
                                 {"role": "assistant", "content": "B"}, {"role": "user", "content": "c"},
                                 {"role": "assistant", "content": "C"}])
    assert regen.answer_turns(d.source) == 3 == d.remaining_turns()
    assert d.prompt() == [{"role": "user", "content": "a"}]
    d.answer("mine", False, 4)
    assert d.prompt()[-2:] == [{"role": "assistant", "content": "mine"}, {"role": "user", "content": "b"}]
    d.answer("  ", False, 1)           # an empty answer ends the conversation before that turn
    assert d.stopped == "empty" and d.prompt() is None and d.remaining_turns() == 1
    assert d.record() == {"id": "x", "conversations": [{"from": "human", "value": "a"},
                                                       {"from": "gpt", "value": "mine"}], "truncated": False}
    assert Dialogue(id="y", source=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"}]).record() is None


def test_prepare_and_training_read_the_folder(setup, builtin, tmp_path, capsys):
    from draftsmith.distill.sources import load_conversations

    loaded = load_conversations(str(builtin))
    assert [c["id"] for c in loaded] == [r["id"] for r in records(builtin)]
    assert all(m["content"] != "an answer written by another model" for c in loaded for m in c["messages"])
    recipe = str(setup / "recipe.yaml")
    assert main(["data", "prepare", recipe, f"data.source={builtin}", "--out", str(tmp_path / "prepared")]) == 0
    assert json.loads((tmp_path / "prepared" / "meta.json").read_text())["train"]["assistant_tokens"] > 0
    assert main(["train", recipe, f"data.source={builtin}", f"run.out_dir={tmp_path}", "run.name=r"]) == 0
    assert (tmp_path / "r" / "summary.json").is_file()


def test_an_unfinished_folder_is_refused_as_data(setup, tmp_path):
    from draftsmith.distill.sources import load_conversations

    out = tmp_path / "unfinished"
    assert main(args(setup, out, "--shard-size", "4")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (out / "shards" / "00001.jsonl").unlink()
    with pytest.raises(DraftsmithError, match="not finished") as info:
        load_conversations(str(out))
    assert "2 of 3 shards" in str(info.value) and "resumes" in str(info.value)


# ------------------------------------------------------------------------------------- resuming

def test_crash_mid_shard_resumes_to_the_same_output(setup, builtin, tmp_path, monkeypatch):
    """A run that dies inside shard 2 leaves shards 0-1; the rerun writes only the rest, and the result
    is the uninterrupted run's, record for record."""
    from draftsmith.distill import local_engine

    out = tmp_path / "crash"
    real = local_engine.BuiltinEngine.generate
    calls = {"n": 0}
    shards_written = []

    def dying(self, prompts):
        calls["n"] += 1
        if len(list((out / "shards").glob("*.jsonl"))) == 2 and calls["n"] > 1:
            shards_written.append(sorted(p.name for p in (out / "shards").glob("*.jsonl")))
            raise KeyboardInterrupt
        return real(self, prompts)

    monkeypatch.setattr(local_engine.BuiltinEngine, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        main(args(setup, out, "--batch-size", "3", "--shard-size", "4"))
    assert shards_written == [["00000.jsonl", "00001.jsonl"]]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    monkeypatch.setattr(local_engine.BuiltinEngine, "generate", real)
    seen = []
    monkeypatch.setattr(regen, "write_shard", lambda folder, index, *a: seen.append(index) or real_write(folder, index, *a))
    assert main(args(setup, out, "--batch-size", "3")) == 0         # shard size read from the folder
    assert seen == [2]
    assert records(out) == records(builtin)


real_write = regen.write_shard


def test_sigkill_then_resume_has_no_duplicate_or_lost_conversation(setup, builtin, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "draftsmith.cli", *args(setup, out, "--batch-size", "1", "--shard-size", "1")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "shards" / "00002.jsonl").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "shards").glob("*.jsonl")))
    assert 3 <= done
    assert main(args(setup, out, "--batch-size", "1")) == 0
    got = records(out)
    assert len({r["id"] for r in got}) == len(got) == 12
    assert got == records(builtin)


def test_two_processes_split_the_shards(setup, builtin, tmp_path):
    """torchrun / accelerate launch: each process takes its own shards; together they write what one
    process writes, and the first one the totals."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "draftsmith.cli", *args(setup, out, "--batch-size", "3", "--shard-size", "2")]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1
    assert records(out) == records(builtin)
    stats = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.json"))]
    assert len(stats) == 6 and sum(s["conversations"] for s in stats) == 12


def test_another_plan_in_the_folder_is_refused(setup, builtin, capsys):
    assert main(args(setup, builtin, "--max-new-tokens", "8")) == 2
    err = capsys.readouterr().err
    assert "another plan" in err and "max_new_tokens: folder 32, now 8" in err and "--overwrite" in err


def test_out_folder_not_written_by_draftsmith_is_left_alone(setup, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(args(setup, mine)) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(args(setup, mine, "--overwrite")) == 2
    assert "no .draftsmith marker" in capsys.readouterr().err and (mine / "notes.txt").is_file()
    out = tmp_path / "again"
    assert main(args(setup, out, "--max-conversations", "2")) == 0
    assert main(args(setup, out, "--max-conversations", "3", "--overwrite")) == 0
    assert len(records(out)) == 3


# ------------------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(setup):
    """A real `transformers serve` process on a free port, serving the tiny target folder."""
    for extra in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(extra, reason="transformers serve needs the serving extras: pip install -e '.[dev]'")
    port = free_port()
    log = open(setup / "serve.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", str(setup / "target"),
                             "--port", str(port), "--host", "127.0.0.1", "--device", "cpu"],
                            env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"transformers serve did not start: {(setup / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_endpoint_engine_against_transformers_serve(setup, builtin, served, tmp_path):
    """Greedy answers from the server are the built-in engine's (same fp32 weights, same template)."""
    out = tmp_path / "endpoint"
    assert main(args(setup, out, "--endpoint", served, "--concurrency", "3", "--shard-size", "5")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["engines"]["endpoint"]["model"] == str(setup / "target")
    assert records(out) == records(builtin)
    assert manifest["counts"]["new_tokens"] == json.loads((builtin / "manifest.json").read_text())["counts"]["new_tokens"]


class FakeServer(BaseHTTPRequestHandler):
    models = ["other-model"]
    prompt_tokens = 3
    failures: list[int] = []       # HTTP codes to answer first, one per request

    def log_message(self, *a):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if FakeServer.failures:
            self._send(FakeServer.failures.pop(0), {"error": "busy"})
            return
        self._send(200, {"model": body["model"], "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": 1}})


@pytest.fixture
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/"
    server.shutdown()
    FakeServer.failures = []


def test_unreachable_server_is_a_clear_error(setup, tmp_path, capsys):
    start = time.time()
    assert main(args(setup, tmp_path / "x", "--endpoint", f"http://127.0.0.1:{free_port()}", "--retries", "1")) == 2
    err = capsys.readouterr().err
    assert "did not answer" in err and "2 tries" in err and "vllm serve" in err
    assert time.time() - start < 30


def test_server_with_another_model_or_tokenizer_is_refused(setup, fake, tmp_path, capsys):
    assert main(args(setup, tmp_path / "x", "--endpoint", fake, "--model", "tiny")) == 2
    err = capsys.readouterr().err
    assert "serves another model" in err and "other-model" in err
    # the only listed model is taken, but it counts the probe's prompt tokens differently from the target
    assert main(args(setup, tmp_path / "y", "--endpoint", fake)) == 2
    err = capsys.readouterr().err
    assert "tokenizes the prompt differently" in err and "'server prompt tokens': 3" in err


def test_transient_server_errors_are_retried(fake):
    from draftsmith.distill.endpoint import ChatClient

    FakeServer.failures = [503, 429]
    client = ChatClient(fake, timeout=5, retries=2, backoff=0.01)
    assert client.request("/chat/completions", {"model": "m", "messages": []})["choices"][0]["message"]["content"] == "hi"
    FakeServer.failures = [500, 500, 500]
    with pytest.raises(DraftsmithError, match="did not answer"):
        client.request("/chat/completions", {"model": "m", "messages": []})
    FakeServer.failures = [400]
    with pytest.raises(DraftsmithError, match="HTTP 400"):
        ChatClient(fake, timeout=5, retries=5, backoff=10).request("/chat/completions", {"model": "m"})


def test_bad_arguments_fail_clearly(setup, tmp_path, capsys):
    assert main(args(setup, tmp_path / "x", "--max-new-tokens", "0")) == 2
    assert "--max-new-tokens must be positive" in capsys.readouterr().err
    with pytest.raises(DraftsmithError, match="--top-p"):
        RegenerateConfig(target="t", source="s", out="o", top_p=0)


# ------------------------------------------------------------------------------- damaged folders

def _drop_last_line(path):
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


DAMAGED_FOLDERS = {
    "manifest cut": (lambda f: (f / "manifest.json").write_text((f / "manifest.json").read_text()[:150]),
                     "manifest.json is not valid JSON"),
    "manifest binary": (lambda f: (f / "manifest.json").write_bytes(bytes(range(256))), "manifest.json is not valid JSON"),
    "manifest without plan": (lambda f: (f / "manifest.json").write_text(json.dumps(
        {**json.loads((f / "manifest.json").read_text()), "plan": 7})), "its plan names no shards"),
    "jsonl cut mid-line": (lambda f: (f / "conversations.jsonl").write_bytes((f / "conversations.jsonl").read_bytes()[:700]),
                           "is not a JSON record"),
    "jsonl cut at a line": (lambda f: _drop_last_line(f / "conversations.jsonl"), "another number of records"),
    "jsonl binary": (lambda f: (f / "conversations.jsonl").write_bytes(b"\xff\xfe" * 50), "cannot be read"),
    "jsonl missing": (lambda f: (f / "conversations.jsonl").unlink(), "conversations.jsonl cannot be read"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_FOLDERS))
def test_damaged_regeneration_folder_is_refused_by_name(setup, builtin, tmp_path, capsys, damage):
    folder = tmp_path / "regen"
    shutil.copytree(builtin, folder)
    edit, needle = DAMAGED_FOLDERS[damage]
    edit(folder)
    assert main(["data", "prepare", str(setup / "recipe.yaml"), f"data.source={folder}",
                 "--out", str(tmp_path / "prepared")]) == 2
    err = capsys.readouterr().err
    assert "draftsmith: error:" in err and "Traceback" not in err and needle in err and str(folder) in err, err


def test_damaged_shard_is_named_and_the_rerun_rewrites_conversations(setup, builtin, tmp_path, capsys):
    from draftsmith.distill.sources import load_conversations

    folder = tmp_path / "regen"
    shutil.copytree(builtin, folder)
    _drop_last_line(folder / "conversations.jsonl")
    with pytest.raises(DraftsmithError, match="Rerun the same"):
        load_conversations(str(folder))
    assert main(args(setup, folder, "--batch-size", "3")) == 0     # conversations.jsonl again, from shards/
    assert records(folder) == records(builtin)
    shard = folder / "shards" / "00001.jsonl"
    shard.write_bytes(shard.read_bytes()[:-20])                      # a shard cut mid-record
    assert main(args(setup, folder, "--batch-size", "3")) == 2
    err = capsys.readouterr().err
    assert "A regenerated shard is damaged" in err and "00001.jsonl" in err and "Traceback" not in err, err
    (folder / "shards" / "00001.json").write_text("[]")
    assert main(args(setup, folder, "--batch-size", "3")) == 2
    assert "shard's counts are damaged" in capsys.readouterr().err
