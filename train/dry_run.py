"""`draftsmith train RECIPE --dry-run [--gpus N --zero S]`: build the target and the drafter on the
meta device (no weights, no data, no memory), print their shapes and parameter counts and an
estimate of the memory one GPU needs, then exit. It checks a cluster recipe before the cluster.

The target's architecture comes from models/architectures.py (a local folder's config.json, or a
table of published architectures for targets whose weights are not here: a Llama-3.1-8B-class model
for the cluster recipe). Memory per GPU, with mixed precision and AdamW:
  target weights (frozen, replicated: it is not part of what DeepSpeed / FSDP shard)
  + trainable drafter: fp32 weights 4P, grads 4P, Adam moments 8P — ZeRO-2 shards grads and
    moments over the GPUs, ZeRO-3 everything; frozen drafter weights 4P
  + activations: the target's logits on the trained rows and the drafter's saved activations, from
    the batch shape (an estimate to ±30%, not a measurement).
"""

from __future__ import annotations

import torch

from draftsmith.distill.objective import Objective
from draftsmith.errors import DraftsmithError
from draftsmith.models.architectures import target_config
from draftsmith.models.mask_blocks import cod_fractions
from draftsmith.train.run import build_drafter

GiB = 1024 ** 3


def _params(module: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable


def _activation_bytes(cfg, tcfg, drafter) -> dict[str, float]:
    """Rough peak activation memory of one micro-batch (bytes)."""
    b, t = cfg.train.batch_size, cfg.data.max_length
    v, h = tcfg.vocab_size, tcfg.hidden_size
    act = 2 if cfg.train.mixed_precision != "no" else 4
    rows = b * t
    out = {"target logits on trained rows (fp32, with softmax)": rows * v * 4 * 2}
    d = cfg.drafter
    if d.kind == "small_lm":
        dh = d.hidden_size or h
        di = d.intermediate_size or tcfg.intermediate_size
        out["drafter activations"] = d.num_layers * rows * (12 * dh + 3 * di) * act
        out["drafter logits (fp32, grad)"] = rows * v * 4 * 3
    elif d.kind == "eagle3" and d.parallel:   # P-EAGLE: one forward over the rows and their mask blocks
        blocks = rows * (sum(cod_fractions(d.parallel_k, d.cod_ratio, d.cod_floor)) - 1)
        vd = drafter.model.config.draft_vocab_size
        per_row = 16 * h + 3 * tcfg.intermediate_size
        out["drafter activations (sequence + mask blocks)"] = (rows + blocks) * per_row * act
        out["mask-block attention mask (bool)"] = b * (t + blocks / b) ** 2
        out["draft-vocabulary targets and logits (fp32, grad)"] = (rows + blocks) * vd * 4 * 4
    elif d.kind == "parallel":
        blocks = rows * (sum(cod_fractions(d.parallel_k, d.cod_ratio, d.cod_floor)) - 1)   # mask elements kept
        c = drafter.model.config      # init_from brings its own architecture
        out["drafter activations (sequence + mask blocks)"] = (c.num_hidden_layers * (rows + blocks)
                                                               * (12 * c.hidden_size + 3 * c.intermediate_size) * act)
        out["mask-block attention mask (bool)"] = b * (t + blocks / b) ** 2
        # logits, the target's rows gathered per block and the loss's fp32 softmaxes: ~24 bytes per row and
        # token with a KD loss, ~10 with CE only (H100, parallel-kd shapes: 39.0 and 18.7 GiB peak)
        per = 24 if Objective.from_config(cfg.loss).needs_target else 10
        out["drafter logits and the loss's fp32 temporaries"] = (rows + blocks) * v * per
    elif d.kind in ("dflash", "dspark"):   # every anchor's block in one forward over the context's keys / values
        c = drafter.model.config
        anchors = min(d.max_anchors, t)
        q = anchors * c.block_size                    # block queries per sequence
        keys = t + q
        per_row = 16 * h + 3 * tcfg.intermediate_size
        out["drafter activations (anchor blocks)"] = c.num_layers * b * q * per_row * act
        # on a GPU, torch's memory-efficient SDPA takes the block mask as an fp32 bias kept for backward and
        # never materialises the [heads, Q, K] scores (the CPU's math kernel does: 8x more per head)
        out["block attention mask (fp32 bias per layer)"] = c.num_layers * b * q * keys * 4
        out["draft-vocabulary targets and logits (fp32, grad)"] = rows * c.draft_vocab_size * 4 + \
            b * anchors * c.drafts * c.draft_vocab_size * 4 * 3
    elif d.kind == "eagle":
        out["drafter activations"] = rows * (14 * h + 3 * tcfg.intermediate_size) * act
        out["drafter logits via the target's head (fp32, grad)"] = rows * v * 4 * 3
    else:
        vd = drafter.model.config.draft_vocab_size
        heads = tcfg.num_attention_heads
        steps = d.ttt_steps
        out["drafter activations (all unrolled steps)"] = steps * rows * (16 * h + 3 * tcfg.intermediate_size) * act
        out["training-time-test attention scores"] = steps * b * heads * t * t * 4 * 2
        out["draft-vocabulary targets and logits (fp32, grad)"] = rows * vd * 4 * (1 + 3 * steps)
    return out


def dry_run(cfg, gpus: int = 1, zero: int = 0) -> dict:
    from transformers import AutoModelForCausalLM

    if gpus < 1 or zero not in (0, 1, 2, 3):
        raise DraftsmithError("--gpus must be >= 1 and --zero one of 0, 1, 2, 3", {"gpus": gpus, "zero": zero})
    tcfg = target_config(cfg.target.name)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(cfg.target.dtype, torch.bfloat16)
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(tcfg, dtype=dtype)
        drafter = build_drafter(cfg, target, None, 0, dry=True)
    t_params = sum(p.numel() for p in target.parameters())
    trainable, frozen = _params(drafter)
    shard_grads = gpus if zero >= 2 else 1
    shard_opt = gpus if zero >= 1 else 1
    shard_weights = gpus if zero >= 3 else 1
    memory = {
        f"target weights ({str(dtype).removeprefix('torch.')}, frozen)": t_params * dtype.itemsize,
        "drafter fp32 weights": 4 * trainable / shard_weights + 4 * frozen,
        "drafter grads (fp32)": 4 * trainable / shard_grads,
        "AdamW moments (fp32)": 8 * trainable / shard_opt,
        **_activation_bytes(cfg, tcfg, drafter),
    }
    total = sum(memory.values())
    inner = drafter.model
    print(f"[dry run] recipe: {cfg.description or cfg.run.name}")
    print(f"[dry run] target {cfg.target.name}: {tcfg.model_type}, {tcfg.num_hidden_layers} layers, hidden "
          f"{tcfg.hidden_size}, vocab {tcfg.vocab_size}, {t_params / 1e6:,.1f}M parameters")
    kind = cfg.drafter.kind + (" (parallel: P-EAGLE)" if cfg.drafter.parallel else "")
    print(f"[dry run] drafter {kind}: {trainable / 1e6:,.2f}M trainable, {frozen / 1e6:,.2f}M frozen")
    for name, p in list(inner.named_parameters())[:24]:
        print(f"    {name:<48} {str(list(p.shape)):<16} {'trained' if p.requires_grad else 'frozen'}")
    for name, b in inner.named_buffers():
        print(f"    {name:<48} {str(list(b.shape)):<16} buffer ({str(b.dtype).removeprefix('torch.')})")
    tokens = cfg.train.batch_size * cfg.train.grad_accum * gpus * cfg.data.max_length
    print(f"[dry run] batch: {cfg.train.batch_size} x {cfg.data.max_length} tokens per GPU, grad_accum "
          f"{cfg.train.grad_accum}, {gpus} GPU(s): up to {tokens:,} tokens per optimizer step, "
          f"{cfg.train.max_steps} steps")
    print(f"[dry run] estimated memory per GPU ({gpus} GPU(s), ZeRO stage {zero}):")
    for name, value in memory.items():
        print(f"    {name:<56} {value / GiB:8.2f} GiB")
    print(f"    {'total (estimate)':<56} {total / GiB:8.2f} GiB")
    return {"target_params": t_params, "drafter_trainable": trainable, "drafter_frozen": frozen,
            "memory_per_gpu_bytes": total, "tokens_per_step": tokens}
