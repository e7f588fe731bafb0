"""`draftsmith data regenerate` and `draftsmith data cache`: their arguments (cli.py adds them under `data`).

As in cli.py, each `cmd_*` imports its command's module when the command runs (a fast `draftsmith --help`)."""

from __future__ import annotations


def add_regenerate_parser(verbs) -> None:
    q = verbs.add_parser(
        "regenerate", help="the target answers every user turn of a conversation source itself",
        description="Regenerate the assistant turns of a conversation source with the target, turn by turn, into a "
                    "folder of ShareGPT JSONL shards (resumable: rerun the same command after an interruption). "
                    "Built-in engine: batched transformers generate (one GPU per process under accelerate launch). "
                    "--endpoint: any OpenAI-compatible chat-completions server (vLLM, SGLang, transformers serve). "
                    "Train on the folder with data.source=DIR.")
    q.add_argument("--target", required=True, help="asset name (smollm2-135m-instruct), transformers folder, .gguf, or hub id")
    q.add_argument("--source", default="sharegpt", help="sharegpt | file.jsonl | saved dataset folder (default sharegpt)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--max-conversations", type=int, default=None, help="the first N conversations (default: all)")
    q.add_argument("--max-new-tokens", type=int, default=512, help="tokens per answer; longer answers are marked truncated")
    q.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="stop a conversation when its next prompt is longer (default: the target's context)")
    q.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    q.add_argument("--top-p", type=float, default=1.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--shard-size", type=int, default=None,
                   help="conversations per shard, the unit of resumption (default 8 x batch size or concurrency)")
    q.add_argument("--batch-size", type=int, default=None,
                   help="built-in engine: sequences per generate call (default: from free GPU memory; 8 on CPU)")
    q.add_argument("--dtype", default="auto", help="built-in engine: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    q.add_argument("--device", default=None, help="built-in engine: cpu | cuda (default: cuda when available)")
    q.add_argument("--endpoint", default=None, help="URL of an OpenAI-compatible server, e.g. http://localhost:8000")
    q.add_argument("--model", default=None, help="endpoint: the served model name (default: the only one listed)")
    q.add_argument("--concurrency", type=int, default=8, help="endpoint: conversations in flight (default 8)")
    q.add_argument("--timeout", type=float, default=600.0, help="endpoint: seconds per request (default 600)")
    q.add_argument("--retries", type=int, default=3, help="endpoint: retries of a failed request (default 3)")
    q.add_argument("--overwrite", action="store_true", help="delete the folder's regeneration and start again")
    q.set_defaults(func=cmd_regenerate)


def cmd_regenerate(args) -> int:
    from draftsmith.distill.regenerate import RegenerateConfig, regenerate

    fields = ("target", "source", "out", "max_conversations", "max_new_tokens", "max_prompt_tokens", "temperature",
              "top_p", "seed", "shard_size", "batch_size", "dtype", "device", "endpoint", "model", "concurrency",
              "timeout", "retries", "overwrite")
    manifest = regenerate(RegenerateConfig(**{f: getattr(args, f) for f in fields}))
    if not manifest.get("complete"):
        return 0     # another process of an accelerate launch finishes the folder
    c = manifest["counts"]
    print(f"{c['conversations']} conversations ({c['answers']} answers, {c['truncated']} truncated, "
          f"{c['dropped']} dropped), {c['new_tokens']} new tokens at {c['new_tokens_per_s']:.1f} tokens/s")
    print(f"wrote {args.out} (train with data.source={args.out})")
    return 0


def add_cache_parser(verbs) -> None:
    q = verbs.add_parser(
        "cache", help="run the target once over a recipe's data and store its signals (offline teacher)",
        description="Store what a recipe's loss needs from the target (the hidden states of the layers its drafter "
                    "reads, the top-k log-probabilities and the remaining mass) in safetensors shards; train on "
                    "them with data.teacher=cache:DIR. Resumable: rerun the same command after an interruption.")
    q.add_argument("recipe", help="recipe name or path to a YAML file")
    q.add_argument("overrides", nargs="*", help="section.key=value (the data settings must match the training run's)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--top-k", type=int, default=64,
                   help="target log-probabilities kept per trained position (default 64); >= the vocabulary "
                        "size stores the full distribution and makes the loss exact")
    q.add_argument("--batch-size", type=int, default=None, help="rows per target forward (default: train.batch_size)")
    q.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    q.add_argument("--overwrite", action="store_true", help="delete the folder's cache and start again")
    q.set_defaults(func=cmd_cache)


def cmd_cache(args) -> int:
    from draftsmith.train.teacher_cache import build_cache

    manifest = build_cache(args.recipe, args.overrides, args.out, top_k=args.top_k, batch_size=args.batch_size,
                           device=args.device, overwrite=args.overwrite)
    for split, m in manifest["plan"]["splits"].items():
        print(f"{split}: {m['rows']} rows, {m['tokens']} tokens, {m['trained']} trained positions")
    print(f"wrote {args.out}: {manifest['bytes'] / 2**20:.1f} MiB (train with data.teacher=cache:{args.out})")
    return 0
