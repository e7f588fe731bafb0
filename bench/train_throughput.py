"""Training throughput of the small_lm recipe: tokens/s, peak memory, and the share of step time
spent in the target's forward (the online teacher signal).

    python bench/train_throughput.py                       # SmolLM2 target, quick recipe shapes, CPU
    python bench/train_throughput.py --device cuda --batch-size 16 --seq-len 1024
Prints one line per configuration; numbers come from timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch

from draftsmith.distill.objective import Objective
from draftsmith.models.small_lm import SmallLMTrainModule, build_small_lm
from draftsmith.models.target import load_target
from draftsmith.train.steps import forward_batch, target_signals
from draftsmith.train.trainer import peak_rss_gib, resolve_mixed_precision


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_gib() * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--precision", default="auto", help="auto | no | bf16")
    args = p.parse_args()

    target = load_target(args.target, "fp32" if args.device == "cpu" else "bf16", device=args.device)
    drafter = build_small_lm(target.model, args.layers, layers_from_target=list(range(args.layers))).float()
    drafter.get_input_embeddings().requires_grad_(False)
    drafter = SmallLMTrainModule(drafter.to(args.device))
    optimizer = torch.optim.AdamW([q for q in drafter.parameters() if q.requires_grad], lr=1e-4)
    precision = resolve_mixed_precision(args.precision, args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, target.vocab_size, (args.batch_size, args.seq_len), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "loss_mask": (torch.rand(ids.shape, generator=g) < 0.75).to(args.device)}
    mask = batch["loss_mask"][:, 1:].clone()
    objective = Objective()     # forward KL
    autocast = lambda: torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)  # noqa: E731
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    step_s, target_s = [], []
    for step in range(args.steps + 2):                      # two warm-up steps
        sync()
        start = time.perf_counter()
        with autocast():
            target_signals(target.model, ids, batch["attention_mask"], mask)
        sync()
        t_target = time.perf_counter() - start
        start = time.perf_counter()
        with autocast():
            loss, _, _ = forward_batch(target.model, drafter, batch, objective)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= 2:
            step_s.append(time.perf_counter() - start)     # a full training step (target forward inside)
            target_s.append(t_target)
    tokens = args.batch_size * args.seq_len
    mean_step = sum(step_s) / len(step_s)
    mean_target = sum(target_s) / len(target_s)
    print(f"device={args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}, "
          f"{torch.get_num_threads()} threads) precision={precision} batch={args.batch_size}x{args.seq_len} "
          f"drafter_layers={args.layers}: {tokens / mean_step:.0f} tokens/s, step {mean_step * 1000:.0f} ms, "
          f"target forward {mean_target * 1000:.0f} ms ({100 * mean_target / mean_step:.0f}% of the step), "
          f"peak memory {peak_memory_mb(args.device):.0f} MiB")


if __name__ == "__main__":
    main()
