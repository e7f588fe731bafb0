"""The benchmark harness: on the same prompts, in one run, after warm-up, it times the target alone
(autoregressive baseline), draftsmith's speculative decoding, and transformers' assisted generation
with the same drafter where transformers supports it.

Timing order: plain and speculative decoding of a prompt alternate which runs first (plain first on
the 1st, 3rd, ... prompt, speculative first on the 2nd, 4th, ...; assisted generation last), so a
shared machine's load, which differs between the first and the second run of a pair, falls on both
alike; each prompt's order is in report.json. The null-drafter floor: on the first few prompts, the
same decoder with a drafter that proposes nothing, timed against plain decoding the same way. Its
speedup is what "no speedup" measures on this machine now; a drafter's speedup within its distance
of 1.0 is noise."""

from __future__ import annotations

import math
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from draftsmith.errors import DraftsmithError
from draftsmith.eval.batch_eval import batch_row
from draftsmith.eval.benchmarks import BenchItem, check_prompt_lengths, load_bench
from draftsmith.eval.decoder import NoDraft, autoregressive_generate, speculative_generate
from draftsmith.eval.draft_length import DraftLengthRule, measure_cost_curve
from draftsmith.eval.metrics import PromptRecord, first_divergence, speedup, summarize
from draftsmith.eval.precision_eval import fastest_plain, precision_row
from draftsmith.models import load_drafter, load_target
from draftsmith.models.target import DTYPES, Target, resolve_dtype
from draftsmith.protocol.drafting import TreeShape
from draftsmith.protocol.sampling import Sampling


@dataclass
class EvalConfig:
    target: str
    drafter: str
    bench: str = "mt_bench"
    num_prompts: int | None = None
    turns: int = 1
    max_new_tokens: int = 128
    k: int | str = "auto"            # "auto": cost-aware draft length up to k_max; N: a fixed chain of N
    tree: str | None = None          # None/none: chains; dynamic[:depth,topk,nodes]; static:FILE
    k_max: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str | None = None
    hf_assisted: bool = True
    batch_sizes: tuple[int, ...] = (1,)   # sizes > 1: batched plain and speculative decoding too (eval/batch_eval.py)
    compile: bool = False                 # every decoder through a static cache and a compiled forward
    plain_dtypes: tuple[str, ...] = ()    # plain decoding in these precisions too (eval/precision_eval.py)

    def __post_init__(self):
        if self.k != "auto" and not (isinstance(self.k, int) and self.k >= 1):
            raise DraftsmithError("k (draft length) must be auto or an integer >= 1", self.k, "Use --k auto or e.g. --k 4")
        if not (isinstance(self.k_max, int) and self.k_max >= 1):   # 0 would draft nothing and still report
            raise DraftsmithError("--k-max (the deepest draft --k auto may choose) must be an integer >= 1",
                                  self.k_max, "Use e.g. --k-max 8 (the default)")
        self.tree_shape = TreeShape.parse(self.tree)
        # the deepest draft path: the tree's depth, else k (auto: up to k_max)
        self.depth = self.tree_shape.depth if self.tree_shape else (self.k_max if self.k == "auto" else self.k)
        if self.max_new_tokens < 1:
            raise DraftsmithError("max_new_tokens must be >= 1", self.max_new_tokens)
        self.sampling = Sampling(self.temperature, self.top_k, self.top_p)  # validates
        sizes = tuple(self.batch_sizes)
        if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
            raise DraftsmithError("--batch-size takes positive integers separated by commas", self.batch_sizes,
                                  "e.g. --batch-size 1,4,16")
        self.batch_sizes = tuple(sorted(set(sizes)))
        for dtype in self.plain_dtypes:    # an unknown name is refused before any work
            if dtype not in DTYPES:
                raise DraftsmithError("--plain-dtypes takes precisions separated by commas", dtype,
                                      f"Use {', '.join(DTYPES)}, e.g. --plain-dtypes fp32")


def check_draft_fits(cfg: EvalConfig, context: int) -> None:
    """A draft sits after the prompt (at least one token) and the root token: its depth, and a tree's
    verified nodes, must fit the target's context, or no step could ever verify it."""
    room = context - 2
    nodes = cfg.tree_shape.nodes if cfg.tree_shape else cfg.depth
    if max(cfg.depth, nodes) > room:
        setting = (f"--tree {cfg.tree}" if cfg.tree_shape else
                   f"--k auto --k-max {cfg.k_max}" if cfg.k == "auto" else f"--k {cfg.k}")
        raise DraftsmithError(f"The draft does not fit the target's context of {context} tokens",
                              f"{setting}: depth {cfg.depth}, {nodes} nodes",
                              f"Draft at most {room} deep and wide (useful draft lengths are 1-8, e.g. --k 4)")


def eos_ids(target: Target) -> tuple[int, ...]:
    ids = set()
    for source in (target.tokenizer.eos_token_id, getattr(target.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return tuple(sorted(ids))


def encode_turn(target: Target, turns: list[str], answers: list[str]) -> list[int]:
    """Token ids of the prompt for the last of `turns`, earlier turns answered by `answers`.

    Chat targets get their chat template; base targets get the turns joined by blank lines.
    """
    tok = target.tokenizer
    if getattr(tok, "chat_template", None):
        messages = []
        for i, user in enumerate(turns):
            messages.append({"role": "user", "content": user})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    parts = []
    for i, user in enumerate(turns):
        parts.append(user)
        if i < len(answers):
            parts.append(answers[i])
    return tok("\n\n".join(parts), add_special_tokens=True)["input_ids"]


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def timed_pair(plain, speculative, device, plain_first: bool):
    """((plain output, s), (speculative output, s)), run in the order asked (module docstring)."""
    if plain_first:
        first = _timed(plain, device)
        return first, _timed(speculative, device)
    second = _timed(speculative, device)
    return _timed(plain, device), second


COST_CURVE_SLOTS = 256
"""The least static cache --compile sizes: measure_cost_curve's 128 cached tokens and 64 new ones fit."""


def compile_target(target: Target, proposer, longest: int, depth: int) -> None:
    """--compile: a static cache for the longest sequence a turn reaches and a draft of `depth` after it (at least
    COST_CURVE_SLOTS, in whole 64s; models/compiled_target.py), and the drafter's linear layers on the target's
    kernel where it is oneDNN's or draftsmith's row kernel (Target.pack_drafter)."""
    target.compile(max(COST_CURVE_SLOTS, -(-(longest + depth + 2) // 64) * 64))
    target.pack_drafter(proposer)


FLOOR_PROMPTS = 4
"""Prompts the null-drafter floor is measured on (the first ones of the run)."""


def hf_generate(target: Target, prompt: list[int], cfg: EvalConfig, eos: tuple[int, ...], extra: dict,
                generator_seed: int) -> list[int]:
    """transformers' generate with the same limits and sampling; `extra` selects assisted decoding."""
    from transformers import GenerationConfig

    extra = dict(extra)
    assistant = extra.pop("assistant_model", None)
    sampling = {} if cfg.sampling.greedy else {"temperature": cfg.temperature, "top_p": cfg.top_p,
                                                "top_k": cfg.top_k or 0}
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=not cfg.sampling.greedy,
                           eos_token_id=list(eos) or None, pad_token_id=(eos[0] if eos else 0), **sampling, **extra)
    ids = torch.tensor([prompt], device=target.device)
    torch.manual_seed(generator_seed)
    with torch.inference_mode():
        out = target.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                                    **({"assistant_model": assistant} if assistant is not None else {}))
    return out[0, len(prompt):].tolist()


def top2_margin(target: Target, prefix: list[int]) -> dict:
    """The target's top-2 logits after `prefix`: a small margin marks a numerical near-tie."""
    logits = target.forward(prefix, target.new_cache(), last_only=True).logits[-1]
    top = logits.topk(2)
    margin = float(top.values[0] - top.values[1])
    # one unit in the last place of the top logit in the target's dtype: batched verification may
    # round differently by a few of these, so a margin within 4 ulp is a numerical near-tie
    ulp = torch.finfo(target.dtype).eps * 2.0 ** math.floor(math.log2(max(abs(float(top.values[0])), 1e-30)))
    return {"top1_token": int(top.indices[0]), "top2_token": int(top.indices[1]), "top2_margin": margin,
            "ulp": ulp, "near_tie": margin <= 4 * ulp}


def _divergence(target: Target, prompt: list[int], ref: list[int], other: list[int]) -> dict | None:
    i = first_divergence(ref, other)
    if i is None:
        return None
    info = {"position": i, "baseline_token": ref[i] if i < len(ref) else None,
            "token": other[i] if i < len(other) else None}
    info.update(top2_margin(target, prompt + ref[:i]))
    return info


class Runner:
    """Holds the loaded target and drafter; runs the three decoders on one prompt."""

    def __init__(self, cfg: EvalConfig, target: Target | None = None, proposer=None):
        self.cfg = cfg
        self.interrupted, self.planned = False, 0
        self.target = target or load_target(cfg.target, cfg.dtype, cfg.device)
        check_draft_fits(cfg, self.target.max_length)
        self.floor_prompts: list[list[int]] = []   # the first FLOOR_PROMPTS prompts, for the null-drafter floor
        self.prompts: list[list[int]] = []         # every prompt of the batch-1 pass, in order (the batched passes')
        self.floor: dict | None = None
        self.proposer = proposer or load_drafter(cfg.drafter, self.target)
        self.eos = eos_ids(self.target)
        kwargs_fn = getattr(self.proposer, "hf_assisted_kwargs", None)
        # transformers drafts chains of a fixed length: k, or 4 (its prompt-lookup default's scale) with --k auto;
        # with --tree it is still the baseline it is (the drafter's chain counterpart), run on the same prompts
        hf_k = cfg.k if isinstance(cfg.k, int) else 4
        self.hf_extra = kwargs_fn(hf_k) if (kwargs_fn and cfg.hf_assisted) else None
        # --k auto: the target's cost curve on this device, measured once; acceptance is learnt online
        self.rule = None
        if cfg.k == "auto" and not cfg.compile:   # --compile measures the compiled forward, once it is sized
            self.rule = DraftLengthRule(measure_cost_curve(self.target, hidden_layers=tuple(self.proposer.hidden_layers)))

    def _gen(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def _limits(self, max_new_tokens: int | None = None) -> dict:
        return dict(max_new_tokens=max_new_tokens or self.cfg.max_new_tokens, sampling=self.cfg.sampling,
                    eos_token_ids=self.eos)

    def run_prompt(self, prompt: list[int], seed: int, max_new_tokens: int | None = None, plain_first: bool = True):
        cfg, t = self.cfg, self.target
        limits = self._limits(max_new_tokens)
        (ar, ar_s), (sd, sd_s) = timed_pair(
            lambda: autoregressive_generate(t, prompt, generator=self._gen(seed), **limits),
            lambda: speculative_generate(t, self.proposer, prompt, k=cfg.depth, tree=cfg.tree_shape, rule=self.rule,
                                         generator=self._gen(seed), **limits), t.device, plain_first)
        hf, hf_s = None, None
        if self.hf_extra is not None:
            hf, hf_s = _timed(lambda: hf_generate(t, prompt, cfg, self.eos, self.hf_extra, seed), t.device)
        return ar, ar_s, sd, sd_s, hf, hf_s

    def warm_up(self, prompt: list[int]) -> None:
        self.run_prompt(prompt, self.cfg.seed, max_new_tokens=min(16, self.cfg.max_new_tokens))

    def null_floor(self) -> dict:
        """The speedup of the decoder with a drafter that proposes nothing (at the same depth, tree and
        draft-length rule) over plain decoding, on the first prompts, in the same alternating order."""
        cfg, t, limits = self.cfg, self.target, self._limits()
        rows = []
        for i, prompt in enumerate(self.floor_prompts):
            seed = cfg.seed + i
            rule = DraftLengthRule(self.rule.curve) if self.rule else None   # fresh: the run's rule keeps its counts
            (ar, ar_s), (nd, nd_s) = timed_pair(
                lambda: autoregressive_generate(t, prompt, generator=self._gen(seed), **limits),
                lambda: speculative_generate(t, NoDraft(), prompt, k=cfg.depth, tree=cfg.tree_shape, rule=rule,
                                             generator=self._gen(seed), **limits), t.device, i % 2 == 0)
            rows.append((len(ar.tokens), ar_s, len(nd.tokens), nd_s, "ar,null" if i % 2 == 0 else "null,ar"))
        return {"speedup": speedup(*(sum(r[j] for r in rows) for j in range(4))), "prompts": len(rows),
                "ar_s": [r[1] for r in rows], "null_s": [r[3] for r in rows], "timing_order": [r[4] for r in rows]}

    def evaluate(self, items: list[BenchItem], progress: bool = True) -> list[PromptRecord]:
        # every prompt is checked before the first runs: a late too-long prompt must not waste the others
        longest = check_prompt_lengths(items, lambda turns, answers: encode_turn(self.target, turns, answers),
                                       self.target.max_length, self.cfg.max_new_tokens)
        if self.cfg.compile:
            compile_target(self.target, self.proposer, longest, self.cfg.depth)
            if self.cfg.k == "auto":    # the draft-length rule's cost curve is the compiled forward's
                self.rule = DraftLengthRule(measure_cost_curve(self.target,
                                                               hidden_layers=tuple(self.proposer.hidden_layers)))
        work = [(item, turn) for item in items for turn in range(len(item.turns))]
        answers: dict[str, list[str]] = {}
        records = []
        self.planned = len(work)
        bar = tqdm(total=len(work), desc="prompts", unit="prompt", disable=not progress)
        try:
            self._loop(work, records, answers, bar)
            self.floor = self.null_floor()
        except KeyboardInterrupt:
            if not records:
                raise
            self.interrupted = True   # the prompts done so far still make a report
        bar.close()
        return records

    def batched(self, records: list[PromptRecord], s: dict, progress: bool = True) -> list[dict]:
        """Batched plain and speculative decoding of the batch-1 pass's prompts at every batch size > 1 asked
        (eval/batch_eval.py); the table's batch-1 row is the pass's own figures (`s`, its summary). Ctrl-C keeps
        the sizes done."""
        prompts, t = self.prompts[: len(records)], self.target
        reference, ids = [r.ar_tokens for r in records], [r.id for r in records]
        rows = [{"batch_size": 1, "plain_tokens_per_s": s["ar_tokens_per_s"], "sd_tokens_per_s": s["sd_tokens_per_s"],
                 "speedup": s["speedup"], "tau": s["tau"], "acceptance_by_position": s["acceptance_by_position"],
                 "nodes_per_step": s["nodes_per_step"], "lossless_match_rate": s["lossless_match_rate"],
                 "divergences_not_near_tie": s["divergences_not_near_tie"]}]
        sizes = [b for b in self.cfg.batch_sizes if b > 1]
        for i, size in enumerate(tqdm(sizes, desc="batch sizes", unit="size", disable=not progress or not sizes)):
            try:
                rows.append(batch_row(self, size, prompts, reference, ids, plain_first=i % 2 == 0,
                                      audit=lambda j, tokens: _divergence(t, prompts[j], reference[j], tokens)))
            except KeyboardInterrupt:
                self.interrupted = True
                break
        return rows

    def precisions(self, records: list[PromptRecord], progress: bool = True) -> list[dict]:
        """Plain decoding of the batch-1 pass's prompts in each of --plain-dtypes other than the run's own
        (eval/precision_eval.py). Ctrl-C keeps the precisions done."""
        prompts, reference = self.prompts[: len(records)], [r.ar_tokens for r in records]
        own = self.target.dtype
        dtypes = [d for d in dict.fromkeys(self.cfg.plain_dtypes) if resolve_dtype(d, self.target.device) != own]
        rows = []
        for dtype in tqdm(dtypes, desc="plain decoding, other precisions", unit="dtype",
                          disable=not progress or not dtypes):
            try:
                rows.append(precision_row(self, dtype, prompts, reference))
            except KeyboardInterrupt:
                self.interrupted = True
                break
        return rows

    def _loop(self, work: list, records: list, answers: dict, bar) -> None:
        cfg, t = self.cfg, self.target
        for index, (item, turn) in enumerate(work):
            prompt = encode_turn(t, item.turns[: turn + 1], answers.get(item.id, []))
            if len(prompt) >= t.max_length:
                raise DraftsmithError(f"Prompt {item.id} (turn {turn + 1}) is longer than the target's context "
                                      f"of {t.max_length} tokens", len(prompt), "Drop it from the benchmark file")
            if index == 0:
                self.warm_up(prompt)
            self.prompts.append(prompt)
            if len(self.floor_prompts) < FLOOR_PROMPTS:
                self.floor_prompts.append(prompt)
            seed = cfg.seed + index
            plain_first = index % 2 == 0
            ar, ar_s, sd, sd_s, hf, hf_s = self.run_prompt(prompt, seed, plain_first=plain_first)
            order = ("ar,sd" if plain_first else "sd,ar") + (",hf" if hf is not None else "")
            # a second turn follows the target's own first answer (the baseline's)
            answers.setdefault(item.id, []).append(t.tokenizer.decode(ar.tokens, skip_special_tokens=True))
            greedy = cfg.sampling.greedy
            records.append(PromptRecord(
                id=item.id, turn=turn + 1, prompt_tokens=len(prompt), ar_tokens=ar.tokens, ar_s=ar_s,
                sd_tokens=sd.tokens, sd_s=sd_s, proposed=sd.proposed, accepted=sd.accepted, emitted=sd.emitted,
                depth=sd.depth, draft_s=sd.draft_s, verify_s=sd.verify_s, unplaced=sd.unplaced,
                predicted=sd.predicted,
                hf_tokens=hf, hf_s=hf_s, timing_order=order,
                divergence=_divergence(t, prompt, ar.tokens, sd.tokens) if greedy else None,
                hf_divergence=_divergence(t, prompt, ar.tokens, hf) if greedy and hf is not None else None,
                extra={"category": item.category}))
            s = summarize(records, cfg.depth, greedy)
            bar.set_postfix(tau=f"{s['tau'] or 0:.2f}", speedup=f"{s['speedup'] or 0:.2f}x")
            bar.update()


def environment(target: Target) -> dict:
    import transformers

    import draftsmith

    device = str(target.device)
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "draftsmith": draftsmith.__version__, "platform": platform.platform(),
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads()}


def run_eval(cfg: EvalConfig, progress: bool = True) -> tuple[dict, list[PromptRecord]]:
    items = load_bench(cfg.bench, cfg.num_prompts, cfg.turns)   # fail fast on a bad bench
    runner = Runner(cfg)
    torch.manual_seed(cfg.seed)
    # SIGTERM (`timeout`, a scheduler's stop) ends the run like Ctrl-C: the prompts done, and the batch sizes
    # done, are reported
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    try:
        records = runner.evaluate(items, progress=progress)
        report = summarize(records, cfg.depth, cfg.sampling.greedy)
        if cfg.batch_sizes != (1,):
            report["batched"] = runner.batched(records, report, progress) if not runner.interrupted else None
        other_precisions = runner.precisions(records, progress) if cfg.plain_dtypes and not runner.interrupted else None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    config = {k: v for k, v in asdict(cfg).items()}
    config.update(dtype=str(runner.target.dtype).replace("torch.", ""), device=str(runner.target.device),
                  eos_token_ids=list(runner.eos), hf_assisted_applies=runner.hf_extra is not None)
    report["baseline"] = baseline(runner.target)
    if other_precisions is not None:
        fastest_plain(report, other_precisions)
    report["draft_length"] = draft_length_report(cfg, runner.rule, records)
    report["timing"] = {"order": "alternating per prompt: plain decoding first on the 1st, 3rd, ... prompt, "
                                 "speculative first on the 2nd, 4th, ...; HF assisted last",
                        "null_drafter_floor": runner.floor}
    report["outputs"] = [{"id": r.id, "turn": r.turn, "plain": r.ar_tokens, "speculative": r.sd_tokens}
                         for r in records]
    report["config"] = config
    report["environment"] = environment(runner.target)
    if runner.interrupted:
        report["interrupted"] = {"prompts_done": len(records), "prompts_planned": runner.planned}
        if report.get("batched"):   # stopped during the batched passes: the sizes in the table are whole
            report["interrupted"].update(batch_sizes_done=[r["batch_size"] for r in report["batched"]],
                                         batch_sizes_planned=list(cfg.batch_sizes))
    return report, records


def baseline(target: Target) -> dict:
    """What the speedup is measured against: plain decoding of the same target in the same run, with the same
    dtype and forward (--compile's static cache and compiled graph, or eager)."""
    compiled = target.compiled is not None
    forward = target.describe_forward()
    return {"decoder": "plain autoregressive decoding, one target forward per token, batch 1",
            "dtype": str(target.dtype).replace("torch.", ""), "forward": forward, "static_cache_slots":
            target.static_length if compiled else None}


def draft_length_report(cfg: EvalConfig, rule: DraftLengthRule | None, records: list[PromptRecord] = ()) -> dict:
    """How draft lengths were chosen: the mode, where the rule's acceptance came from (`acceptance_source`),
    and for `--k auto` the measured cost curve and the histogram of draft nodes verified per step."""
    out = {"mode": "auto" if rule else "fixed", "depth": cfg.depth, "tree": cfg.tree or "none",
           "acceptance_source": acceptance_source(rule, records)}
    if rule is not None:
        out.update(cost_curve=rule.curve.as_dict(), nodes_per_step_histogram=rule.histogram(),
                   draft_ms_per_node=round(rule.node_s * 1e3, 3))
    return out


def acceptance_source(rule: DraftLengthRule | None, records: list[PromptRecord]) -> str:
    """"fixed k" without the rule; with `--k auto`, "confidence head" when the drafts carried the drafter's own
    predicted acceptance (Draft.accept: some verified node has one), else "online calibration"."""
    if rule is None:
        return "fixed k"
    return "confidence head" if any(r.predicted for r in records) else "online calibration"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
