"""Reference parity for EAGLE-3 (issue 18): SpecForge 0.2.0's trainer on the rows draftsmith trains on.

Three stages in two venvs (SpecForge pins its own torch/transformers, so it lives apart; nothing
crosses between them but safetensors and JSON):

  plan    draftsmith's venv: the recipe + a prepared data folder -> OUT/plan.{json,safetensors}: the
          rows of every micro-step in draftsmith's order (train/data.py BatchSchedule), the LR of every
          step (train/trainer.py cosine_with_warmup), draftsmith's draft vocabulary, the tapped layers,
          the target's folder and the held-out rows the trainer evaluates on.
  train   SpecForge's venv: SpecForge's EAGLE-3 head (LlamaForCausalLMEagle3, OnlineEagle3Model's
          training-time test and loss, Eagle3TrainStrategy's 0.8^i weights, TrainerCore,
          BF16Optimizer with its clipping) trained on exactly those rows. The target runs in
          transformers instead of an SGLang server and hands over what SGLang's capture would: the
          outputs of the layers SpecForge taps ([1, L//2-1, L-4]) and the final normed hidden state,
          per sequence; SpecForge's offline path does the rest (normalize_offline_sample,
          DataCollatorWithPadding, TargetHead's shift and LM head). Writes OUT/specforge-sglang
          (SpecForge's own SGLang export: save_pretrained + _serving_state, safetensors),
          OUT/specforge/summary.json and OUT/specforge/verify.safetensors (SpecForge's own logits of
          every TTT step on held-out rows, for the conversion check).
  verify  draftsmith's venv: draftsmith's load of the export (models/formats.py read_head_folder) run on
          the same inputs as SpecForge's forward (max logit difference, argmax agreement per TTT step);
          the held-out figures of both heads through the trainer's own heldout_metrics; the table; the
          `draftsmith eval` commands. bench/specforge_parity.sh runs all of it and draftsmith's training.

On CPU SpecForge needs two stand-ins, both off its math: its fused Triton loss kernel (core/loss.py,
LogSoftmaxLoss) is replaced by the eager reference it ships beside it (_compute_loss, same value and
gradient), and its @torch.compile'd helpers run eagerly unless --compile. Triton is not installed: a
stub is in sys.modules only while core/loss.py is imported (for its @triton.jit decorators). SGLang is
neither installed nor imported on this path.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


# ------------------------------------------------------------------------------------ plan (draftsmith)

def cmd_plan(a) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from draftsmith.models.layers import default_aux_layers
    from draftsmith.models.target import resolve_model_folder
    from draftsmith.train.config import load_recipe, resolve_recipe_path
    from draftsmith.train.data import BatchSchedule
    from draftsmith.train.prepared import is_prepared, load_prepared
    from draftsmith.train.run import draft_vocab
    from draftsmith.train.trainer import cosine_with_warmup

    if not is_prepared(a.data):
        sys.exit(f"{a.data} is not a prepared data folder: run `draftsmith data prepare {a.recipe} --out {a.data}`")
    overrides = [f"data.source={a.data}", *a.overrides]
    cfg = load_recipe(resolve_recipe_path(a.recipe), overrides)
    d, t = cfg.drafter, cfg.train
    if d.kind != "eagle3" or d.parallel:
        sys.exit(f"the parity bench compares EAGLE-3 heads; {a.recipe} trains kind {d.kind}")
    folder = resolve_model_folder(cfg.target.name)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_rows, heldout_rows = load_prepared(cfg, tokenizer)     # checked against this recipe's data settings
    tc = AutoConfig.from_pretrained(folder)
    schedule = BatchSchedule(len(train_rows), t.batch_size, 1, 0, t.seed)
    order = torch.tensor([schedule.indices(m) for m in range(t.max_steps * t.grad_accum)], dtype=torch.long)
    factor = cosine_with_warmup(t.warmup_steps, t.max_steps, t.min_lr_ratio)
    lrs = torch.tensor([t.lr * factor(s) for s in range(t.max_steps)], dtype=torch.float64)
    draft_ids = draft_vocab(train_rows, tc.vocab_size, d.draft_vocab_size or tc.vocab_size // 4)
    plan = {
        "recipe": a.recipe, "overrides": overrides, "data": str(Path(a.data).resolve()),
        "target": cfg.target.name, "target_folder": folder, "num_layers": tc.num_hidden_layers,
        "aux_layers": list(d.aux_layers or default_aux_layers(tc.num_hidden_layers)),
        "ttt_steps": d.ttt_steps, "ttt_decay": d.ttt_decay, "draft_vocab_size": len(draft_ids),
        "max_length": cfg.data.max_length, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
        "max_steps": t.max_steps, "lr": t.lr, "warmup_steps": t.warmup_steps, "min_lr_ratio": t.min_lr_ratio,
        "draftsmith_max_grad_norm": t.max_grad_norm, "draftsmith_weight_decay": t.weight_decay,
        "draftsmith_optimizer": t.optimizer, "draftsmith_loss": objective_name(cfg),
        "draftsmith_mixed_precision": t.mixed_precision, "seed": t.seed,
        "heldout_rows": min(len(heldout_rows), cfg.eval.batches * t.batch_size), "train_rows": len(train_rows),
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    save_tensors({"order": order, "lr": lrs, "draft_ids": draft_ids.long()}, out / "plan.safetensors")
    print(f"[plan] {t.max_steps} steps x {t.batch_size} rows of {len(train_rows)}, aux layers {plan['aux_layers']}, "
          f"draft vocabulary {len(draft_ids)}, LR {t.lr} warm-up {t.warmup_steps} cosine to {t.min_lr_ratio} -> {out}")


def objective_name(cfg) -> str:
    from draftsmith.distill.objective import Objective

    return Objective.from_config(cfg.loss).describe()


# ----------------------------------------------------------------------------------- train (SpecForge)

def import_specforge(compile_: bool):
    """SpecForge's EAGLE-3 training path, importable on a CPU-only venv without triton or sglang."""
    import types

    import torch._dynamo
    from torch.utils._triton import has_triton_package

    torch._dynamo.config.disable = not compile_
    has_triton_package()                      # torch decides "no triton" before the stub exists (cached)
    torch.compile(lambda x: x, dynamic=None)  # and imports inductor's triton shims now, not under the stub
    if "specforge.core.loss" not in sys.modules:
        triton, language = types.ModuleType("triton"), types.ModuleType("triton.language")
        triton.jit = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
        triton.next_power_of_2 = lambda n: 1 << (int(n) - 1).bit_length()
        language.constexpr = object
        triton.language = language
        sys.modules.update({"triton": triton, "triton.language": language})
        try:
            import specforge.core.loss as sf_loss
        finally:
            del sys.modules["triton"], sys.modules["triton.language"]

        class EagerLogSoftmaxLoss:
            """LogSoftmaxLoss's contract with SpecForge's own eager reference: -Σ_v m·p·log q, mean over B·T."""

            @staticmethod
            def apply(logits, target_p, position_mask):
                return sf_loss._compute_loss(logits, target_p, position_mask)

        sf_loss.LogSoftmaxLoss = EagerLogSoftmaxLoss
    import specforge.algorithms.eagle3.model as sf_model
    sf_model.LogSoftmaxLoss = sys.modules["specforge.core.loss"].LogSoftmaxLoss
    return sf_model


def read_rows(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The rows of a prepared .npz (train/prepared.py's format; the plan stage has checked the files)."""
    with np.load(path, allow_pickle=False) as f:
        ids, packed, offsets = f["input_ids"], f["loss_mask"], f["offsets"]
    mask = np.unpackbits(packed, count=len(ids)).astype(bool)
    return [(ids[a:b].astype(np.int64), mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def specforge_vocab(rows, vocab_size: int, size: int):
    """generate_vocab_mapping_file's counting (assistant tokens, row by row) and mapping, without its .pt cache."""
    from collections import Counter

    from specforge.data.preprocessing import process_token_dict_to_mappings

    counts = Counter()
    for ids, mask in rows:
        unique, freq = torch.as_tensor(ids)[torch.as_tensor(mask)].unique(return_counts=True)
        counts.update(dict(zip(unique.tolist(), freq.tolist())))
    return process_token_dict_to_mappings(counts, size, vocab_size)


def build_draft(plan: dict, dtype: torch.dtype, d2t: torch.Tensor, t2d: torch.Tensor):
    """build_eagle3_draft with the config SpecForge generates from the target (_generate_draft_config)."""
    from transformers import AutoConfig

    from specforge.modeling.auto import AutoDraftModel
    from specforge.modeling.target.target_utils import target_vocab_size
    from specforge.training.model_loading import _TARGET_ARCHITECTURE_FIELDS, _draft_config_from_dict

    tc = AutoConfig.from_pretrained(plan["target_folder"])
    payload = {f: getattr(tc, f) for f in _TARGET_ARCHITECTURE_FIELDS if getattr(tc, f, None) is not None}
    payload.update(vocab_size=target_vocab_size(tc), architectures=["LlamaForCausalLMEagle3"], model_type="llama",
                   num_hidden_layers=1, tie_word_embeddings=False, use_cache=True,
                   draft_vocab_size=plan["draft_vocab_size"],
                   eagle_config={"eagle_aux_hidden_state_layer_ids": plan["aux_layers"], "use_aux_hidden_state": True})
    payload.setdefault("pad_token_id", 0)
    draft = AutoDraftModel.from_config(_draft_config_from_dict(payload), attention_backend="sdpa", torch_dtype=dtype)
    draft.t2d.copy_(t2d)
    draft.d2t.copy_(d2t)
    draft.load_embedding(plan["target_folder"])
    draft.freeze_embedding()
    return draft.to(dtype)


class Capture:
    """What SGLang's EAGLE-3 capture hands SpecForge, from a transformers target: per sequence, the
    outputs of the tapped decoder layers concatenated [1, T, 3H] and the final normed hidden [1, T, H]."""

    def __init__(self, target, layers: list[int]):
        self.base, self.layers, self.store = target.model, layers, {}
        for i in layers:
            self.base.layers[i].register_forward_hook(
                lambda m, a, out, i=i: self.store.__setitem__(i, out[0] if isinstance(out, tuple) else out))

    @torch.no_grad()
    def sample(self, ids: np.ndarray, mask: np.ndarray, max_len: int) -> dict:
        from specforge.algorithms.eagle3.data import normalize_offline_sample

        input_ids = torch.as_tensor(ids)
        final = self.base(input_ids=input_ids[None]).last_hidden_state
        aux = torch.cat([self.store[i] for i in self.layers], dim=-1)
        raw = {"aux_hidden_state": aux, "hidden_state": final, "input_ids": input_ids,
               "loss_mask": torch.as_tensor(mask, dtype=torch.long)}
        return normalize_offline_sample(raw, max_len)


def make_batch(capture: Capture, rows, max_len: int):
    from specforge.data.utils import DataCollatorWithPadding
    from specforge.runtime.contracts import TrainBatch

    tensors = DataCollatorWithPadding()([capture.sample(ids, mask, max_len) for ids, mask in rows])
    tensors = {k: v for k, v in tensors.items() if v is not None}
    return TrainBatch(sample_ids=[str(i) for i in range(len(rows))], strategy="eagle3", tensors=tensors,
                      metadata={"target_repr": "hidden_state"}), sum(len(ids) for ids, _ in rows)


def cmd_train(a) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(a.seed)
    sf_model = import_specforge(a.compile)
    from specforge.export.checkpoint_io import apply_legacy_rope_scaling
    from specforge.export.to_sglang import WEIGHT_MAPS, _serving_state
    from specforge.lr_scheduler import CosineAnnealingWarmupLR
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.training.backend import FSDPTrainingBackend, ParallelConfig
    from specforge.training.controller import TrainerCore
    from specforge.training.strategies.base import Eagle3TrainStrategy, StepContext

    out = Path(a.out)
    plan = json.loads((out / "plan.json").read_text())
    tensors = load_file(str(out / "plan.safetensors"))
    steps = plan["max_steps"]                  # the budget: the plan's train.max_steps
    dtype = getattr(torch, a.dtype)
    data = Path(plan["data"])
    train_rows, heldout_rows = read_rows(data / "train.npz"), read_rows(data / "heldout.npz")[: plan["heldout_rows"]]
    target = AutoModelForCausalLM.from_pretrained(plan["target_folder"], dtype=dtype).eval().requires_grad_(False)
    vocab = target.config.vocab_size
    d2t, t2d = specforge_vocab(train_rows, vocab, plan["draft_vocab_size"])
    theirs = torch.arange(len(d2t)) + d2t
    overlap = len(set(theirs.tolist()) & set(tensors["draft_ids"].tolist()))
    if a.vocab == "draftsmith":
        ids = tensors["draft_ids"]
        d2t, t2d = ids - torch.arange(len(ids)), torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True)
    draft = build_draft(plan, dtype, d2t, t2d)
    model = sf_model.OnlineEagle3Model(draft, length=plan["ttt_steps"], attention_backend="sdpa").to(dtype)
    head = TargetHead(plan["target_folder"])
    head.fc.weight.data.copy_(target.get_output_embeddings().weight.data)
    head.freeze_weights()
    head = head.eval().to(dtype)
    strategy = Eagle3TrainStrategy(model, target_head=head, ploss_decay=plan["ttt_decay"])

    def optimizer_factory(module):
        opt = BF16Optimizer(module, lr=plan["lr"], max_grad_norm=a.max_grad_norm, total_steps=steps,
                            warmup_ratio=min(1.0, plan["warmup_steps"] / steps), lr_scheduler="cosine")
        # BF16Optimizer rounds warmup_ratio*total down and anneals to 0; draftsmith's schedule: exact
        # warm-up steps, cosine to min_lr_ratio*lr. SpecForge's own scheduler class, its eta_min.
        opt.scheduler = CosineAnnealingWarmupLR(opt.optimizer, total_steps=steps, warmup_steps=plan["warmup_steps"],
                                                eta_min=plan["min_lr_ratio"] * plan["lr"])
        return opt

    backend = FSDPTrainingBackend(ParallelConfig(world_size=1, param_dtype=dtype), optimizer_factory=optimizer_factory)
    backend.prepare_model(model, wrap=False, optimizer_target=model)
    core = TrainerCore(strategy, backend, accumulation_steps=plan["grad_accum"])
    capture = Capture(target, plan["aux_layers"])
    order = tensors["order"]
    print(f"[specforge] {steps} steps x {plan['batch_size']} rows, {a.dtype}, vocabulary: {a.vocab} "
          f"(SpecForge's own top-{plan['draft_vocab_size']} shares {overlap} ids with draftsmith's), "
          f"clip {a.max_grad_norm}", flush=True)
    model.train()
    log, lr_used, tokens, window, window_tokens, start = [], [], 0, time.time(), 0, time.time()
    for step in range(steps):
        lr_used.append(backend.optimizer.get_learning_rate())
        for micro in range(plan["grad_accum"]):
            m = step * plan["grad_accum"] + micro
            batch, n = make_batch(capture, [train_rows[i] for i in order[m].tolist()], plan["max_length"])
            result = core.train_step(batch, StepContext(global_step=step, total_steps=steps))
            tokens, window_tokens = tokens + n, window_tokens + n
        if (step + 1) % a.log_every == 0 or step + 1 == steps:
            rate = window_tokens / max(1e-9, time.time() - window)
            entry = {"step": step + 1, "loss": result.loss, "lr": lr_used[-1], "tokens": tokens, "tokens_per_s": rate,
                     **{k: v for k, v in result.metrics.items() if k.startswith("acc_")}}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            window, window_tokens = time.time(), 0
    seconds, rss = time.time() - start, peak_rss_gib()   # the training loop's (and loading's) peak
    lr_gap = float(np.max(np.abs(np.array(lr_used) - tensors["lr"].numpy())))

    heldout = evaluate(model, strategy, capture, heldout_rows, plan)
    export = out / "specforge-sglang"
    full = {k: v for k, v in draft.state_dict().items() if "embed" not in k.lower()}
    draft.save_pretrained(str(export), state_dict=_serving_state(full, WEIGHT_MAPS["LlamaForCausalLMEagle3"]))
    apply_legacy_rope_scaling(str(export))
    (out / "specforge").mkdir(exist_ok=True)
    verify_bundle(draft, target, capture, heldout_rows, plan, a.verify_tokens, out / "specforge" / "verify.safetensors")
    summary = {"trainer": "SpecForge 0.2.0", "steps": steps, "tokens": tokens, "seconds": seconds,
               "tokens_per_s": tokens / seconds, "peak_rss_gib": rss, "peak_rss_gib_with_checks": peak_rss_gib(),
               "dtype": a.dtype,
               "vocab": a.vocab, "vocab_overlap_with_draftsmith": overlap, "max_grad_norm": a.max_grad_norm,
               "compile": a.compile, "seed": a.seed, "max_lr_gap_vs_draftsmith_schedule": lr_gap,
               "heldout_specforge_metrics": heldout, "log": log, "torch_threads": torch.get_num_threads()}
    (out / "specforge" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[specforge] done: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s, peak RSS "
          f"{rss:.2f} GiB, LR gap vs draftsmith's schedule {lr_gap}; export {export}", flush=True)


@torch.no_grad()
def evaluate(model, strategy, capture, rows, plan) -> dict:
    """SpecForge's own held-out view: its per-step accuracy acc_i under its own (offset) loss mask."""
    from specforge.training.strategies.base import StepContext

    model.eval()
    totals: dict[str, list[float]] = {}
    b = plan["batch_size"]
    for i in range(0, len(rows), b):
        batch, _ = make_batch(capture, rows[i:i + b], plan["max_length"])
        out = strategy.forward_loss(batch, StepContext())
        for k, (c, d) in enumerate(zip(out.metrics["acc_corrects"], out.metrics["acc_denoms"])):
            totals.setdefault(f"acc_{k}", [0.0, 0.0])
            totals[f"acc_{k}"][0] += float(c)
            totals[f"acc_{k}"][1] += float(d)
    model.train()
    return {k: c / max(d, 1e-9) for k, (c, d) in totals.items()}


@torch.no_grad()
def verify_bundle(draft, target, capture, rows, plan, max_tokens: int, path: Path) -> None:
    """SpecForge's own training forward (OnlineEagle3Model, fp32 copy of the trained draft) on two held-out
    rows; the logits of every TTT step are taken from compute_logits as the forward calls it."""
    import copy

    import specforge.algorithms.eagle3.model as sf_model
    from specforge.data.utils import DataCollatorWithPadding
    from specforge.modeling.target.target_head import TargetHead

    picked = [(ids[:max_tokens], mask[:max_tokens]) for ids, mask in rows[:2]]
    picked[1] = (picked[1][0][: max_tokens * 3 // 4], picked[1][1][: max_tokens * 3 // 4])   # a padded row too
    batch = DataCollatorWithPadding()([capture.sample(ids, mask, plan["max_length"]) for ids, mask in picked])
    fp32 = copy.deepcopy(draft).float().eval()
    seen = []
    own = fp32.compute_logits
    fp32.compute_logits = lambda h: seen.append(own(h)) or seen[-1]
    model = sf_model.OnlineEagle3Model(fp32, length=plan["ttt_steps"], attention_backend="sdpa")
    logits = target.get_output_embeddings()(batch["target"]).float()
    input_ids, logits, loss_mask = TargetHead.preprocess(None, batch["input_ids"], logits, batch["loss_mask"])
    model(input_ids=input_ids, attention_mask=batch["attention_mask"], target=logits, loss_mask=loss_mask,
          hidden_states=batch["hidden_state"].float())
    save_tensors({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "hidden_state": batch["hidden_state"].float(), "logits": torch.stack(seen).float()}, path)


# --------------------------------------------------------------------------------- verify (draftsmith)

def cmd_verify(a) -> None:
    from safetensors.torch import load_file

    from draftsmith.models.checks import TargetShape
    from draftsmith.models.formats import read_head_folder
    from draftsmith.models.target import load_target

    out = Path(a.out)
    plan = json.loads((out / "plan.json").read_text())
    target = load_target(plan["target"], "fp32", device="cpu")
    shape = TargetShape.of(target.model)
    sf_head = read_head_folder(out / "specforge-sglang", shape).float().eval()
    check = conversion_check(sf_head, target, plan, load_file(str(out / "specforge" / "verify.safetensors")))
    (out / "conversion_check.json").write_text(json.dumps(check, indent=2) + "\n")
    print(f"[verify] SpecForge forward vs draftsmith's load of {out / 'specforge-sglang'} (fp32): max |dlogit| "
          f"{check['max_abs_diff']:.2e}, argmax agreement {check['argmax_agreement']:.6f}", flush=True)
    for row in check["per_step"]:
        print(f"  step {row['step']}: max |dlogit| {row['max_abs_diff']:.2e}, mean {row['mean_abs_diff']:.2e}, "
              f"argmax agreement {row['argmax_agreement']:.6f} over {row['rows']} rows")
    heads = {"SpecForge 0.2.0": sf_head}
    for folder in a.draftsmith_head:     # <run>-sglang: the export of run folder OUT/<run>
        heads[run_name(folder)] = read_head_folder(Path(folder), shape).float().eval()
    rows = a.heldout_rows if a.heldout_rows is not None else plan["heldout_rows"]
    table = {name: heldout_figures(head, target, plan, rows) for name, head in heads.items()}
    suffix = "" if a.heldout_rows is None else f"-{rows or 'all'}"      # the trainer's eval rows keep the plain names
    (out / f"heldout{suffix}.json").write_text(json.dumps(table, indent=2) + "\n")
    md = parity_table(out, plan, table)
    (out / f"parity{suffix}.md").write_text(md)
    print(md)
    print("[verify] measure both heads (MT-bench 80, greedy, k=4; one at a time on a quiet machine):")
    for name, folder in (("specforge", out / "specforge-sglang"), *((run_name(f), f) for f in a.draftsmith_head)):
        if folder:
            print(f"  draftsmith eval --target {plan['target']} --drafter {folder} --bench mt_bench --num-prompts 80 "
                  f"--max-new-tokens 128 --temperature 0 --k 4 --out {out / f'eval-{name}'}")


def run_name(head_folder) -> str:
    """A draftsmith head's row name: its run folder's (`OUT/draftsmith-sglang` -> `draftsmith`)."""
    return Path(head_folder).name.removesuffix("-sglang")


def loop_rate(metrics: Path) -> float:
    """Tokens per second of draftsmith's training loop from its logged windows (its summary's minutes also
    hold the held-out evaluations and checkpoints; SpecForge's figure is its loop alone as well)."""
    tokens, seconds = 0, 0.0
    for line in metrics.read_text().splitlines():
        entry = json.loads(line)
        if "tokens_per_s" in entry:
            seconds += (entry["tokens"] - tokens) / entry["tokens_per_s"]
            tokens = entry["tokens"]
    return tokens / max(seconds, 1e-9)


def parity_table(out: Path, plan: dict, heldout: dict) -> str:
    """trainer | steps | tokens | tokens/s | peak RSS | held-out greedy match per TTT step | predicted tau(k=4)."""
    runs = {}
    sf = out / "specforge" / "summary.json"
    if sf.is_file():
        s = json.loads(sf.read_text())
        runs["SpecForge 0.2.0"] = (s["steps"], s["tokens"], s["tokens_per_s"], s["peak_rss_gib"])
    for name in heldout:
        ds = out / name / "summary.json"
        if name != "SpecForge 0.2.0" and ds.is_file():
            s = json.loads(ds.read_text())
            runs[name] = (s["step"], s["tokens"], loop_rate(out / name / "metrics.jsonl"), s["peak_rss_gib"])
    n = plan["ttt_steps"]
    lines = ["| trainer | steps | tokens | tokens/s | peak RSS GiB | held-out greedy match, TTT step 0.." + str(n - 1)
             + " | predicted tau (k=4) |", "|---|---|---|---|---|---|---|"]
    for name, figures in heldout.items():
        steps, tokens, rate, rss = runs.get(name, ("-",) * 4)
        match = " / ".join(f"{figures.get(f'ttt_greedy_match_step{i}', float('nan')):.3f}" for i in range(n))
        cells = [name, steps, tokens, f"{rate:.0f}" if rate != "-" else rate, f"{rss:.2f}" if rss != "-" else rss,
                 match, f"{figures.get('ttt_tau_greedy_k4', float('nan')):.3f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def conversion_check(head, target, plan: dict, bundle: dict) -> dict:
    """draftsmith's unroll of the loaded head (Eagle3TrainModule.unroll, the trainer's own TTT) on SpecForge's
    inputs vs SpecForge's logits. Row t of step i is compared where its input token t+1+i exists."""
    from draftsmith.models.eagle3 import Eagle3TrainModule

    ids, attention, hidden, theirs = (bundle[k] for k in ("input_ids", "attention_mask", "hidden_state", "logits"))
    module = Eagle3TrainModule(head, target.model, plan["ttt_steps"], plan["ttt_decay"], objective=None)
    embeds = target.model.get_input_embeddings()(ids).float()
    lengths = attention.sum(1)
    per_step, worst, agree, total = [], 0.0, 0, 0
    for i, h in enumerate(module.unroll(embeds, list(hidden.float().chunk(3, dim=-1)), [])):
        n = ids.shape[1] - 2 - i
        mine, ref = head.logits(h[:, :n]).float(), theirs[i][:, :n]
        keep = torch.arange(n)[None] + 1 + i < lengths[:, None]                     # [B, n]
        diff = (mine - ref).abs()[keep]
        same = (mine.argmax(-1) == ref.argmax(-1))[keep]
        per_step.append({"step": i, "rows": int(keep.sum()), "max_abs_diff": float(diff.max()),
                         "mean_abs_diff": float(diff.mean()), "argmax_agreement": float(same.float().mean())})
        worst, agree, total = max(worst, float(diff.max())), agree + int(same.sum()), total + int(keep.sum())
    return {"max_abs_diff": worst, "argmax_agreement": agree / max(1, total), "rows": total, "per_step": per_step,
            "logit_scale": float(theirs.abs().max()), "dtype": "float32"}


def heldout_figures(head, target, plan: dict, count: int) -> dict:
    """The trainer's held-out metrics (train/steps.py heldout_metrics, under the trainer's autocast) on the
    first `count` held-out rows (0: all of them), for a loaded head: the same code and rows for every head."""
    from draftsmith.distill.objective import Objective
    from draftsmith.models.eagle3 import Eagle3TrainModule
    from draftsmith.train.config import load_recipe, resolve_recipe_path
    from draftsmith.train.data import collate
    from draftsmith.train.prepared import read_rows as draftsmith_rows
    from draftsmith.train.steps import heldout_metrics
    from draftsmith.train.trainer import resolve_mixed_precision

    cfg = load_recipe(resolve_recipe_path(plan["recipe"]), plan["overrides"])
    rows = draftsmith_rows(Path(plan["data"]) / "heldout.npz")
    n, b = (min(count, len(rows)) if count else len(rows)), plan["batch_size"]
    batches = [collate([rows[j] for j in range(i, min(i + b, n))], plan["pad_id"]) for i in range(0, n, b)]
    module = Eagle3TrainModule(head, target.model, plan["ttt_steps"], plan["ttt_decay"], Objective.from_config(cfg.loss))
    module.eval()
    bf16 = resolve_mixed_precision(cfg.train.mixed_precision, "cpu") == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return heldout_metrics(target.model, module, batches, module.objective, cfg.eval.k_max)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    q = verbs.add_parser("plan", help="draftsmith's venv: rows, order, LR, vocabulary -> OUT/plan.*")
    q.add_argument("--recipe", default="smollm2-135m/eagle3-ttt-quick")
    q.add_argument("--data", required=True, help="a folder written by `draftsmith data prepare`")
    q.add_argument("--out", required=True)
    q.add_argument("overrides", nargs="*", help="recipe overrides section.key=value (train.max_steps=N, ...)")
    q.set_defaults(func=cmd_plan)
    q = verbs.add_parser("train", help="SpecForge's venv: train SpecForge's head on the plan, export, verify bundle")
    q.add_argument("--out", required=True)
    q.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="SpecForge's model.torch_dtype (default bfloat16: draft and target in bf16, fp32 Adam masters)")
    q.add_argument("--vocab", default="specforge", choices=("specforge", "draftsmith"),
                   help="SpecForge's own top-N mapping of the same rows, or draftsmith's d2t/t2d")
    q.add_argument("--max-grad-norm", type=float, default=0.5, help="SpecForge's default 0.5")
    q.add_argument("--seed", type=int, default=42, help="SpecForge's default training.seed")
    q.add_argument("--compile", action="store_true", help="keep SpecForge's @torch.compile (inductor on CPU)")
    q.add_argument("--log-every", type=int, default=10)
    q.add_argument("--verify-tokens", type=int, default=128, help="tokens per row of the conversion check")
    q.set_defaults(func=cmd_train)
    q = verbs.add_parser("verify", help="draftsmith's venv: conversion check, held-out figures, eval commands")
    q.add_argument("--out", required=True)
    q.add_argument("--draftsmith-head", action="append", default=[],
                   help="a draftsmith head exported as OUT/<run>-sglang to compare on the same rows (repeatable)")
    q.add_argument("--heldout-rows", type=int, default=None,
                   help="held-out rows to score (0: every row of the prepared held-out split; default: the trainer's "
                        "eval.batches x batch_size); writes OUT/heldout-N.json and OUT/parity-N.md")
    q.set_defaults(func=cmd_verify)
    a = p.parse_args(argv)
    a.func(a)


if __name__ == "__main__":
    main()
