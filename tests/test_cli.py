"""`draftsmith eval` through the real CLI on tiny saved models: a valid report, clear errors."""

import json

import pytest

from draftsmith.cli import main

from conftest import tiny_llama
from tiny import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = make_tiny_tokenizer()
    vocab = len(tok)
    for name, seed, layers in [("target", 0, 2), ("drafter", 1, 1)]:
        model = tiny_llama(seed, layers=layers, vocab=vocab)
        model.config.eos_token_id = tok.eos_token_id
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    other = tiny_llama(2, layers=1, vocab=vocab + 8)
    other.save_pretrained(root / "wrong-vocab")
    bench = root / "bench.jsonl"
    bench.write_text('{"prompt": "Hello! How can I help you today?"}\n'
                     '{"turns": ["What is the capital of France?", "And of Italy?"], "id": "geo"}\n')
    return root


def run(args):
    return main(["eval", *map(str, args)])


def test_eval_writes_a_valid_report(tiny_folders, tmp_path):
    out = tmp_path / "report"
    rc = run(["--target", tiny_folders / "target", "--drafter", tiny_folders / "drafter", "--bench",
              tiny_folders / "bench.jsonl", "--turns", 1, "--max-new-tokens", 12, "--k", 3, "--device", "cpu",
              "--out", out])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for key in ["tau", "tau_per_request_mean", "acceptance_rate", "acceptance_by_position", "steps", "new_tokens",
                "ar_tokens_per_s", "sd_tokens_per_s", "speedup", "hf_assisted_tokens_per_s", "lossless_match_rate"]:
        assert key in report
    assert report["lossless_match_rate"] == 1.0
    assert report["divergences_not_near_tie"] == 0
    assert report["hf_assisted_match_rate"] == 1.0
    assert len(report["acceptance_by_position"]) == 3
    assert report["num_prompts"] == 2 and len(report["prompts"]) == 2
    assert report["config"]["k"] == 3 and report["environment"]["torch"]
    assert (out / "report.md").read_text().startswith("# draftsmith eval")
    assert (out / "acceptance.png").stat().st_size > 1000
    # the output folder now holds a report: a second run is refused, --overwrite allows it
    assert run(["--target", tiny_folders / "target", "--drafter", "prompt-lookup", "--bench",
                tiny_folders / "bench.jsonl", "--out", out]) == 2
    assert run(["--target", tiny_folders / "target", "--drafter", "prompt-lookup", "--bench", tiny_folders / "bench.jsonl",
                "--turns", 2, "--max-new-tokens", 8, "--temperature", 0.8, "--top-p", 0.9, "--out", out,
                "--overwrite"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lossless_match_rate"] is None and report["num_prompts"] == 2   # geo's two turns


def test_eval_with_a_tree_still_runs_transformers_assisted_generation(tiny_folders, tmp_path):
    """--tree changes draftsmith's drafts, not the baseline: transformers' assisted generation (the drafter's chain
    counterpart, here the small LM as assistant model) runs on the same prompts."""
    out = tmp_path / "report"
    assert run(["--target", tiny_folders / "target", "--drafter", tiny_folders / "drafter", "--bench",
                tiny_folders / "bench.jsonl", "--max-new-tokens", 8, "--tree", "dynamic:2,2,3", "--device", "cpu",
                "--out", out]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["tree"] == "dynamic:2,2,3" and report["lossless_match_rate"] == 1.0
    assert report["hf_assisted_tokens_per_s"] is not None and report["hf_assisted_match_rate"] == 1.0


def test_plain_decoding_in_other_precisions_names_the_fastest(tiny_folders, tmp_path):
    """--plain-dtypes (eval/precision_eval.py): the same prompts decoded plainly by the target in each precision, a
    row each next to the run's own; the report names the fastest and the speedup over it; the run's own precision
    is not timed twice."""
    out = tmp_path / "report"
    assert run(["--target", tiny_folders / "target", "--drafter", "prompt-lookup", "--bench",
                tiny_folders / "bench.jsonl", "--max-new-tokens", 8, "--dtype", "fp32", "--device", "cpu",
                "--plain-dtypes", "bf16,fp32", "--no-hf-assisted", "--out", out]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["plain_by_dtype"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"] and rows[0]["this_run"]
    assert rows[1]["prompts"] == 2 and rows[1]["new_tokens"] > 0 and 0 <= rows[1]["same_outputs_as_run"] <= 1
    fastest = max(rows, key=lambda r: r["plain_tokens_per_s"])
    assert report["fastest_plain"] == {"dtype": fastest["dtype"], "plain_tokens_per_s": fastest["plain_tokens_per_s"]}
    assert report["speedup_over_fastest_plain"] == pytest.approx(report["sd_tokens_per_s"] / fastest["plain_tokens_per_s"])
    assert report["speedup_over_fastest_plain"] <= report["speedup"] + 1e-9
    md = (out / "report.md").read_text()
    assert "## Plain decoding in each precision" in md and "| speedup_over_fastest_plain |" in md
    over = report["speedup_over_fastest_plain"]
    assert report["break_even_tau"] == pytest.approx(report["tau"] / over)
    verdict = f"slower than {fastest['dtype']} plain decoding here** ({over:.3f}x)" if over < 1 else \
        f"Speculative decoding is {over:.3f}x the fastest plain decoding ({fastest['dtype']})"
    assert verdict in md and f"breaks even at τ {report['break_even_tau']:.2f}" in md


@pytest.mark.parametrize("native", [True, False])
def test_dtype_native_is_bf16_only_where_the_cpu_computes_it(tiny_folders, tmp_path, monkeypatch, capsys, native):
    """--dtype native: bf16 where the CPU has oneDNN bf16 kernels, else fp32 (on an AVX2 CPU bf16 is emulated: eager
    bf16 forwards cost more than fp32's; compiled ones run draftsmith's row kernel, bench/results/cpu-avx2).
    --plain-dtypes fp32,bf16 then times the other precision only. An explicit bf16 on such a CPU loads, with a
    warning that says so and what --compile does with it."""
    from draftsmith.models import target as target_module
    from draftsmith.train import trainer

    monkeypatch.setattr(target_module, "native_bf16", lambda device: native)
    monkeypatch.setattr(trainer, "native_bf16", lambda device: native)
    out = tmp_path / "report"
    assert run(["--target", tiny_folders / "target", "--drafter", "prompt-lookup", "--bench",
                tiny_folders / "bench.jsonl", "--max-new-tokens", 4, "--dtype", "native", "--device", "cpu",
                "--plain-dtypes", "fp32,bf16", "--no-hf-assisted", "--out", out]) == 0
    rows = json.loads((out / "report.json").read_text())["plain_by_dtype"]
    own, other = ("bfloat16", "float32") if native else ("float32", "bfloat16")
    assert [r["dtype"] for r in rows] == [own, other] and rows[0]["this_run"]
    emulated = "bf16 is emulated on this CPU (oneDNN has no bf16 kernels here: no AVX512-BF16 or AMX): an eager bf16 " \
               "forward costs more than fp32's here; with --compile the linear layers run on draftsmith's row kernel"
    assert (emulated in capsys.readouterr().err) is not native     # the fp32 run's bf16 plain decoding warns
    target_module.load_target(str(tiny_folders / "target"), "bf16", "cpu")
    assert (emulated in capsys.readouterr().err) is not native
    assert trainer.resolve_mixed_precision("auto", "cpu") == ("bf16" if native else "no")


@pytest.mark.parametrize("extra,message", [
    (["--bench", "nope"], "Unknown benchmark|unknown bench"),
    (["--drafter", "no-such-drafter"], "Unknown drafter"),
    (["--k", "0"], "k \\(draft length\\) must be auto or an integer >= 1"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "1.5"], "top_p must lie in \\(0, 1\\]"),
    (["--plain-dtypes", "fp33"], "--plain-dtypes takes precisions.*fp33"),
    (["--drafter", "WRONG"], "vocabulary \\(\\d+ tokens\\) differs from the target's \\(\\d+ tokens\\)"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_folders, tmp_path, capsys, extra, message):
    args = {"--target": tiny_folders / "target", "--drafter": "prompt-lookup",
            "--bench": tiny_folders / "bench.jsonl", "--out": tmp_path / "out"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = tiny_folders / "wrong-vocab" if value == "WRONG" else value
    assert run([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert "draftsmith: error:" in err
    import re
    assert re.search(message, err, re.IGNORECASE), err
    assert not (tmp_path / "out" / "report.json").exists()


def test_prompt_longer_than_context(tiny_folders, tmp_path, capsys):
    long_bench = tmp_path / "long.jsonl"
    long_bench.write_text(json.dumps({"prompt": "word " * 600}) + "\n")
    assert run(["--target", tiny_folders / "target", "--drafter", "prompt-lookup", "--bench", long_bench,
                "--out", tmp_path / "out"]) == 2
    assert "do not fit the target's context of 512 tokens" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_divergence_report_flags_near_ties():
    import torch
    from draftsmith.eval.harness import top2_margin
    from draftsmith.models.target import Target

    class Fixed(Target):
        def __init__(self, logits, dtype):
            self.dtype, self._logits = dtype, logits

        def new_cache(self):
            return None

        def forward(self, ids, cache, hidden_layers=(), last_only=False):
            return type("Out", (), {"logits": self._logits[None]})()

    tie = top2_margin(Fixed(torch.tensor([20.0, 19.875, 1.0]), torch.bfloat16), [1])
    assert tie["near_tie"] and tie["ulp"] == 0.125        # bf16 spacing at 16..32
    real = top2_margin(Fixed(torch.tensor([20.0, 17.0, 1.0]), torch.bfloat16), [1])
    assert not real["near_tie"] and real["top2_margin"] == 3.0
    assert not top2_margin(Fixed(torch.tensor([20.0, 19.875, 1.0]), torch.float32), [1])["near_tie"]


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_eval_reports_the_prompts_done(tiny_folders, tmp_path, monkeypatch, capsys, how):
    """Ctrl-C or SIGTERM (`timeout`, a scheduler) after two prompts: exit 130 and a report of those two."""
    import os
    import signal

    from draftsmith.eval.harness import Runner

    bench = tmp_path / "five.jsonl"
    bench.write_text("".join(f'{{"prompt": "Question number {i}?"}}\n' for i in range(5)))
    real, calls = Runner.run_prompt, []

    def stop_at_third(self, prompt, seed, max_new_tokens=None, **order):
        if max_new_tokens is None:                      # not the warm-up
            calls.append(1)
            if len(calls) == 3:
                if how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                raise KeyboardInterrupt
        return real(self, prompt, seed, max_new_tokens, **order)

    monkeypatch.setattr(Runner, "run_prompt", stop_at_third)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "report"
    rc = run(["--target", tiny_folders / "target", "--drafter", "prompt-lookup", "--bench", bench,
              "--max-new-tokens", 6, "--device", "cpu", "--out", out])
    assert rc == 130
    assert "interrupted after 2 of 5 prompts" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] == {"prompts_done": 2, "prompts_planned": 5}
    assert report["num_prompts"] == 2 and report["lossless_match_rate"] == 1.0
    assert "Interrupted: 2 of 5 prompts ran" in (out / "report.md").read_text()
    assert signal.getsignal(signal.SIGTERM) == before      # the eval's handler is removed again


def test_export_help_says_which_kinds_each_serving_format_takes(capsys):
    """speculators writes eagle3 and P-EAGLE (peagle) heads and refuses kind eagle; sglang writes eagle
    and eagle3 and refuses P-EAGLE (models/formats.py, docs/formats.md)."""
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "speculators (vLLM: kind eagle3, and P-EAGLE as its peagle type; not kind eagle)" in text
    assert "sglang (SGLang: kinds eagle and eagle3; not P-EAGLE" in text


def test_report_md_shows_16_draft_positions_report_json_all(tiny_folders, tmp_path):
    out = tmp_path / "report"
    assert run(["--target", tiny_folders / "target", "--drafter", "prompt-lookup", "--bench",
                tiny_folders / "bench.jsonl", "--max-new-tokens", 4, "--k", 40, "--device", "cpu",
                "--no-hf-assisted", "--out", out]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["acceptance_by_position"]) == 40 and len(report["accepted_length_histogram"]) == 41
    md = (out / "report.md").read_text()
    alphas = next(line for line in md.splitlines() if line.startswith("| acceptance_by_position"))
    assert "α16=" in alphas and "α17=" not in alphas and "(α17..α40 in report.json)" in alphas
    hist = next(line for line in md.splitlines() if line.startswith("| accepted_length_histogram"))
    assert hist.count(",") == 16 and "(24 more in report.json)" in hist


def test_timing_order_alternates_and_the_report_shows_the_null_drafter_floor(tiny_folders, tmp_path, monkeypatch):
    """Plain and speculative decoding of a prompt alternate which runs first; the null-drafter floor is
    the same decoder with a drafter that proposes nothing (NoDraft), on the first min(4, n) prompts."""
    from draftsmith.eval import harness

    calls = []
    real_ar, real_sd = harness.autoregressive_generate, harness.speculative_generate

    def ar(*a, **kw):
        calls.append("ar")
        return real_ar(*a, **kw)

    def sd(target, proposer, *a, **kw):
        calls.append("null" if isinstance(proposer, harness.NoDraft) else "sd")
        assert kw["k"] == 2                       # the null pass drafts at the run's depth: the same decoder path
        return real_sd(target, proposer, *a, **kw)

    monkeypatch.setattr(harness, "autoregressive_generate", ar)
    monkeypatch.setattr(harness, "speculative_generate", sd)
    bench = tmp_path / "three.jsonl"
    bench.write_text("".join(f'{{"prompt": "Question number {i}?"}}\n' for i in range(3)))
    out = tmp_path / "report"
    assert run(["--target", tiny_folders / "target", "--drafter", "prompt-lookup", "--bench", bench, "--k", 2,
                "--max-new-tokens", 4, "--device", "cpu", "--no-hf-assisted", "--out", out]) == 0
    assert calls == ["ar", "sd",                                    # warm-up
                     "ar", "sd", "sd", "ar", "ar", "sd",            # prompts 1-3
                     "ar", "null", "null", "ar", "ar", "null"]      # the floor on the same three
    report = json.loads((out / "report.json").read_text())
    assert [row["timing_order"] for row in report["prompts"]] == ["ar,sd", "sd,ar", "ar,sd"]
    floor = report["timing"]["null_drafter_floor"]
    assert floor["prompts"] == 3 and floor["speedup"] > 0 and floor["timing_order"] == ["ar,null", "null,ar", "ar,null"]
    assert "alternating per prompt" in report["timing"]["order"]
    md = (out / "report.md").read_text()
    assert f"| null_drafter_floor | {floor['speedup']:.3f} " in md and "Timing order: alternating" in md
