"""The benchmark harness: on the same prompts, in one run, after warm-up, it times the target alone
(autoregressive baseline), draftsmith's speculative decoding, and transformers' assisted generation
with the same drafter where transformers supports it."""

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
from draftsmith.eval.benchmarks import BenchItem, check_prompt_lengths, load_bench
from draftsmith.eval.decoder import autoregressive_generate, speculative_generate
from draftsmith.eval.draft_length import DraftLengthRule, measure_cost_curve
from draftsmith.eval.drafting import TreeShape
from draftsmith.eval.metrics import PromptRecord, first_divergence, summarize
from draftsmith.eval.verify import Sampling
from draftsmith.models import load_drafter, load_target
from draftsmith.models.target import Target


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

    def __post_init__(self):
        if self.k != "auto" and not (isinstance(self.k, int) and self.k >= 1):
            raise DraftsmithError("k (draft length) must be auto or an integer >= 1", self.k, "Use --k auto or e.g. --k 4")
        self.tree_shape = TreeShape.parse(self.tree)
        # the deepest draft path: the tree's depth, else k (auto: up to k_max)
        self.depth = self.tree_shape.depth if self.tree_shape else (self.k_max if self.k == "auto" else self.k)
        if self.max_new_tokens < 1:
            raise DraftsmithError("max_new_tokens must be >= 1", self.max_new_tokens)
        self.sampling = Sampling(self.temperature, self.top_k, self.top_p)  # validates


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
        self.proposer = proposer or load_drafter(cfg.drafter, self.target)
        self.eos = eos_ids(self.target)
        kwargs_fn = getattr(self.proposer, "hf_assisted_kwargs", None)
        # transformers drafts chains of a fixed length: k, or 4 (its prompt-lookup default's scale) with --k auto
        hf_k = cfg.k if isinstance(cfg.k, int) else 4
        self.hf_extra = kwargs_fn(hf_k) if (kwargs_fn and cfg.hf_assisted and not cfg.tree_shape) else None
        # --k auto: the target's cost curve on this device, measured once; acceptance is learnt online
        self.rule = None
        if cfg.k == "auto":
            self.rule = DraftLengthRule(measure_cost_curve(self.target, hidden_layers=tuple(self.proposer.hidden_layers)))

    def _gen(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def run_prompt(self, prompt: list[int], seed: int, max_new_tokens: int | None = None):
        cfg, t = self.cfg, self.target
        limits = dict(max_new_tokens=max_new_tokens or cfg.max_new_tokens, sampling=cfg.sampling,
                      eos_token_ids=self.eos)
        ar, ar_s = _timed(lambda: autoregressive_generate(t, prompt, generator=self._gen(seed), **limits), t.device)
        sd, sd_s = _timed(lambda: speculative_generate(t, self.proposer, prompt, k=cfg.depth, tree=cfg.tree_shape,
                                                       rule=self.rule, generator=self._gen(seed), **limits), t.device)
        hf, hf_s = None, None
        if self.hf_extra is not None:
            hf, hf_s = _timed(lambda: hf_generate(t, prompt, cfg, self.eos, self.hf_extra, seed), t.device)
        return ar, ar_s, sd, sd_s, hf, hf_s

    def warm_up(self, prompt: list[int]) -> None:
        self.run_prompt(prompt, self.cfg.seed, max_new_tokens=min(16, self.cfg.max_new_tokens))

    def evaluate(self, items: list[BenchItem], progress: bool = True) -> list[PromptRecord]:
        # every prompt is checked before the first runs: a late too-long prompt must not waste the others
        check_prompt_lengths(items, lambda turns, answers: encode_turn(self.target, turns, answers),
                             self.target.max_length, self.cfg.max_new_tokens)
        work = [(item, turn) for item in items for turn in range(len(item.turns))]
        answers: dict[str, list[str]] = {}
        records = []
        self.planned = len(work)
        bar = tqdm(total=len(work), desc="prompts", unit="prompt", disable=not progress)
        try:
            self._loop(work, records, answers, bar)
        except KeyboardInterrupt:
            if not records:
                raise
            self.interrupted = True   # the prompts done so far still make a report
        bar.close()
        return records

    def _loop(self, work: list, records: list, answers: dict, bar) -> None:
        cfg, t = self.cfg, self.target
        for index, (item, turn) in enumerate(work):
            prompt = encode_turn(t, item.turns[: turn + 1], answers.get(item.id, []))
            if len(prompt) >= t.max_length:
                raise DraftsmithError(f"Prompt {item.id} (turn {turn + 1}) is longer than the target's context "
                                      f"of {t.max_length} tokens", len(prompt), "Drop it from the benchmark file")
            if index == 0:
                self.warm_up(prompt)
            seed = cfg.seed + index
            ar, ar_s, sd, sd_s, hf, hf_s = self.run_prompt(prompt, seed)
            # a second turn follows the target's own first answer (the baseline's)
            answers.setdefault(item.id, []).append(t.tokenizer.decode(ar.tokens, skip_special_tokens=True))
            greedy = cfg.sampling.greedy
            records.append(PromptRecord(
                id=item.id, turn=turn + 1, prompt_tokens=len(prompt), ar_tokens=ar.tokens, ar_s=ar_s,
                sd_tokens=sd.tokens, sd_s=sd_s, proposed=sd.proposed, accepted=sd.accepted, emitted=sd.emitted,
                depth=sd.depth, draft_s=sd.draft_s, verify_s=sd.verify_s,
                hf_tokens=hf, hf_s=hf_s,
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
    # SIGTERM (`timeout`, a scheduler's stop) ends the run like Ctrl-C: the prompts done are reported
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    try:
        records = runner.evaluate(items, progress=progress)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    config = {k: v for k, v in asdict(cfg).items()}
    config.update(dtype=str(runner.target.dtype).replace("torch.", ""), device=str(runner.target.device),
                  eos_token_ids=list(runner.eos), hf_assisted_applies=runner.hf_extra is not None)
    report = summarize(records, cfg.depth, cfg.sampling.greedy)
    report["draft_length"] = draft_length_report(cfg, runner.rule)
    report["config"] = config
    report["environment"] = environment(runner.target)
    if runner.interrupted:
        report["interrupted"] = {"prompts_done": len(records), "prompts_planned": runner.planned}
    return report, records


def draft_length_report(cfg: EvalConfig, rule: DraftLengthRule | None) -> dict:
    """How draft lengths were chosen: the mode, and for `--k auto` the measured cost curve and the
    histogram of draft nodes verified per step."""
    out = {"mode": "auto" if rule else "fixed", "depth": cfg.depth, "tree": cfg.tree or "none"}
    if rule is not None:
        out.update(cost_curve=rule.curve.as_dict(), nodes_per_step_histogram=rule.histogram(),
                   draft_ms_per_node=round(rule.node_s * 1e3, 3))
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
