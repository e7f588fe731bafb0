"""`draftsmith` command line: train | export | eval | recipes | data prepare | data regenerate | data cache.

Each `cmd_*` imports its command's module when the command runs, so `draftsmith --help` loads neither torch
nor transformers. These are the only deliberate function-body imports of draftsmith modules: the library below
imports at the top of each module, in the one direction of the layers (pyproject.toml, [tool.importlinter]).
"""

from __future__ import annotations

import argparse
import sys

from draftsmith.data_cli import add_cache_parser, add_regenerate_parser
from draftsmith.errors import DraftsmithError


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure a drafter with the built-in speculative decoder",
                       description="AR baseline, draftsmith speculative decoding and HF assisted generation, "
                                   "on the same prompts in one run; writes report.json, report.md, acceptance.png")
    p.add_argument("--target", required=True, help="asset name (smollm2-135m-instruct), transformers folder, .gguf, or hub id")
    p.add_argument("--drafter", required=True, help="prompt-lookup | truncated:N | exported drafter folder")
    p.add_argument("--bench", default="mt_bench", help="mt_bench | humaneval | sharegpt-heldout | file.jsonl")
    p.add_argument("--num-prompts", type=int, default=None, help="keep the first N prompts (default: all)")
    p.add_argument("--turns", type=int, default=1, help="user turns per conversation (MT-bench has 2)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--k", type=_k_value, default="auto",
                   help="auto (default: draft length chosen per step from the measured cost curve and the "
                        "drafter's confidence, up to --k-max) | N (a fixed chain of N drafts)")
    p.add_argument("--k-max", type=int, default=8, help="deepest draft with --k auto (default 8)")
    p.add_argument("--tree", default=None,
                   help="none (chains) | dynamic[:depth,topk,nodes] (EAGLE-2, default 6,8,48) | static:FILE "
                        "(JSON list of rank paths, Medusa style)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA) | native (bf16 where the device "
                   "computes it natively: CUDA, a CPU with AVX512-BF16 or AMX; else fp32) | fp32 | bf16 | fp16")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--no-hf-assisted", action="store_true", help="skip transformers' assisted generation")
    p.add_argument("--batch-size", type=_batch_sizes, default=(1,),
                   help="1 (default) | N[,N...]: also decode the prompts N at a time (continuous batching), plain "
                        "and speculative, and table tokens/s, ratio, tau and losslessness per batch size")
    p.add_argument("--compile", action="store_true",
                   help="run the target through a static KV cache and a torch.compile'd forward (inductor; on a CPU "
                        "the linear layers on the kernel measured fastest there: draftsmith's row kernel, built on "
                        "first use, oneDNN's with each weight packed once, or mm), plain and speculative decoding alike, at every --batch-size; on a CPU every row of a "
                        "verified chain then has plain decoding's logits bit for bit, fp32 and bf16 (a tree's rows "
                        "too in fp32; in bf16 its off-chain rows up to rounding); compiling costs 2-3 minutes on a "
                        "CPU the first time, well under one once inductor's cache holds the graph (a later run on "
                        "the same model, dtype and torch)")
    p.add_argument("--plain-dtypes", type=_dtype_list, default=(),
                   help="also time plain decoding of the same prompts with the target in these precisions (e.g. "
                        "fp32 when --dtype bf16): the report names the fastest plain decoding and the speedup over it")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.set_defaults(func=cmd_eval)


def _k_value(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes auto or an integer, not {text!r}") from None


def _dtype_list(text: str) -> tuple[str, ...]:
    return tuple(d for d in text.split(",") if d)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--batch-size takes positive integers separated by commas (e.g. 1,4,16), "
                                         f"not {text!r}")
    return sizes


def cmd_eval(args) -> int:
    from draftsmith.eval.harness import EvalConfig, run_eval
    from draftsmith.eval.report import check_out_dir, write_report

    cfg = EvalConfig(target=args.target, drafter=args.drafter, bench=args.bench, num_prompts=args.num_prompts,
                     turns=args.turns, max_new_tokens=args.max_new_tokens, k=args.k, k_max=args.k_max, tree=args.tree,
                     temperature=args.temperature,
                     top_p=args.top_p, top_k=args.top_k, seed=args.seed, dtype=args.dtype, device=args.device,
                     hf_assisted=not args.no_hf_assisted, batch_sizes=args.batch_size,
                     compile=args.compile, plain_dtypes=args.plain_dtypes)
    out = check_out_dir(args.out, args.overwrite)
    try:
        report, records = run_eval(cfg)
    except KeyboardInterrupt:   # Ctrl-C or SIGTERM before the first prompt finished: nothing to report
        print("draftsmith: interrupted before the first prompt finished: 0 prompts done, no report written",
              file=sys.stderr)
        return 130
    write_report(report, records, out)
    print((out / "report.md").read_text().split("## Per prompt")[0])
    print(f"wrote {out}/report.json, report.md, acceptance.png")
    if report.get("interrupted"):
        i = report["interrupted"]
        sizes = (f" and batch sizes {', '.join(map(str, i['batch_sizes_done']))} of "
                 f"{', '.join(map(str, i['batch_sizes_planned']))}" if "batch_sizes_done" in i else "")
        print(f"draftsmith: interrupted after {i['prompts_done']} of {i['prompts_planned']} prompts{sizes}; "
              "the report covers those", file=sys.stderr)
        return 130
    return 0


def add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a drafter from a recipe",
                       description="Train a drafter. Overrides: section.key=value (e.g. train.max_steps=100).")
    p.add_argument("recipe", help="recipe name (smollm2-135m/small_lm-kd-quick) or path to a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--resume", action="store_true", help="continue from the run's last complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run folder and start again")
    p.add_argument("--dry-run", action="store_true",
                   help="build target and drafter on the meta device, print shapes, parameters and memory per GPU")
    p.add_argument("--gpus", type=int, default=1, help="--dry-run: GPUs the memory estimate is for")
    p.add_argument("--zero", type=int, default=0, help="--dry-run: DeepSpeed ZeRO stage (0 = DDP)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", help="list the recipes in this repository")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("export", help="export a trained drafter")
    p.add_argument("run_dir", help="the run folder, e.g. runs/small_lm-kd-quick")
    p.add_argument("--format", default="hf",
                   help="hf (draftsmith / transformers folder, every kind) | speculators (vLLM: kind eagle3, and "
                        "P-EAGLE as its peagle type; not kind eagle) | sglang (SGLang: kinds eagle and eagle3; "
                        "not P-EAGLE nor norm_before_residual: true). docs/formats.md")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", default=None, help="checkpoint name or folder (default: the latest complete one)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare training data")
    verbs = p.add_subparsers(dest="verb", required=True)
    q = verbs.add_parser("prepare", help="tokenise a recipe's data once, for runs where the raw data is not",
                         description="Tokenise a recipe's data (its target's tokenizer, its data section and split) "
                                     "into a compact folder; train on it with data.source=FOLDER.")
    q.add_argument("recipe", help="recipe name or path to a YAML file")
    q.add_argument("overrides", nargs="*", help="section.key=value (e.g. data.max_conversations=20000)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
    q.set_defaults(func=cmd_data_prepare)
    add_regenerate_parser(verbs)
    add_cache_parser(verbs)


def cmd_data_prepare(args) -> int:
    from draftsmith.train.rows import prepare

    meta = prepare(args.recipe, args.overrides, args.out, overwrite=args.overwrite)
    for split in ("train", "heldout"):
        m = meta[split]
        print(f"{split}: {m['rows']} rows, {m['tokens']} tokens, {m['assistant_tokens']} assistant tokens")
    print(f"wrote {args.out} (train with data.source={args.out})")
    return 0


def cmd_train(args) -> int:
    from draftsmith.train.run import train

    if args.dry_run:
        from draftsmith.train.config import load_recipe, resolve_recipe_path
        from draftsmith.train.dry_run import dry_run

        path = resolve_recipe_path(args.recipe)
        cfg = load_recipe(path, args.overrides)
        cfg.run.name = cfg.run.name or path.stem
        dry_run(cfg, gpus=args.gpus, zero=args.zero)
        return 0
    summary = train(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite)
    return 143 if summary.get("stopped") else 0    # 128 + SIGTERM: stopped early, resumable


def cmd_recipes(args) -> int:
    from draftsmith.train.config import format_recipes_table, list_recipes

    print(format_recipes_table(list_recipes()))
    return 0


def cmd_export(args) -> int:
    from draftsmith.train.export import export

    out = export(args.run_dir, args.format, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"exported {args.run_dir} as {args.format} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftsmith", description="Train, export and measure speculative-decoding drafters.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_train_parsers(sub)
    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DraftsmithError as e:
        print(f"draftsmith: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
