"""One GPU, the parallel-kd recipe's shapes: a SmolLM2-shaped random target (bf16) and its 4-layer
parallel drafter (k = 8, COD 0.7 / 0.2), batch 8 x 1024 under bf16 autocast. Prints seconds per
micro-step and peak GPU memory (the dry run estimates 21.5 GiB), then the same for the small_lm drafter.

    PYTHONPATH=<folder holding draftsmith> python3 bench/parallel_gpu_check.py [--steps 4] [--only-parallel] [section.key=value ...]
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from draftsmith.distill.objective import Objective
from draftsmith.train.config import load_recipe
from draftsmith.train.dry_run import target_config
from draftsmith.train.run import build_drafter
from draftsmith.train.steps import forward_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only-parallel", action="store_true")
    ap.add_argument("overrides", nargs="*", help="section.key=value for the parallel recipe")
    args = ap.parse_args()
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(target_config("smollm2-135m-instruct")).to("cuda", torch.bfloat16)
    target.eval().requires_grad_(False)
    runs = [("smollm2-135m/parallel-kd", args.overrides)]
    if not args.only_parallel:
        runs.append(("smollm2-135m/small_lm-kd", ["train.batch_size=8"]))
    for recipe, extra in runs:
        cfg = load_recipe(recipe, extra)
        module = build_drafter(cfg, target, None, 0).cuda()
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.train.lr)
        b, t = cfg.train.batch_size, cfg.data.max_length
        ids = torch.randint(3, 49152, (b, t), device="cuda")
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "loss_mask": torch.arange(t, device="cuda")[None].expand(b, -1) >= t // 5}
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _, _ = forward_batch(target, module, batch, Objective.from_config(cfg.loss))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{recipe} {' '.join(extra)}: {b} x {t} tokens, loss {loss.item():.3f}, {min(times[1:] or times):.3f} s per micro-step "
              f"(best of {len(times) - 1} after warm-up), peak {peak:.1f} GiB", flush=True)
        del module, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
