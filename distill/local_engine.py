"""The built-in regeneration engine: batched transformers `generate` with left padding.

Answers from several conversations share a generate call: a queue holds every conversation of a
shard whose next turn is due, and a batch takes the first `batch_size` of them; a conversation
rejoins the queue's end with its next turn once its answer is in. Under `accelerate launch` each
process loads the target on its own GPU and takes its own shards (distill/regenerate.py).
"""

from __future__ import annotations

from collections import deque

import torch

from draftsmith.distill.dialogue import Dialogue, RegenerateConfig
from draftsmith.errors import DraftsmithError
from draftsmith.models.target import default_device, load_target, resolve_dtype

CPU_BATCH = 8
"""On a CPU a batch mostly amortises Python overhead; larger ones gain little."""
MAX_BATCH = 256


def generation_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: bf16 on a GPU that runs it (fp16 on older ones), fp32 on CPU."""
    if dtype == "auto" and device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return resolve_dtype(dtype, device)


def default_batch_size(model: torch.nn.Module, tokens_per_sequence: int) -> int:
    """Sequences per generate call that fit in 70% of the free GPU memory: each holds its KV cache
    for `tokens_per_sequence` tokens, plus one layer's prefill activations (SwiGLU-sized)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return CPU_BATCH
    c = model.config
    size = next(model.parameters()).element_size()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * size + (4 * c.hidden_size + 3 * c.intermediate_size) * size
    per_sequence = per_token * tokens_per_sequence + 4 * 4 * c.vocab_size    # + fp32 scores of the newest token
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_BATCH, int(0.7 * free // per_sequence)))


class BuiltinEngine:
    def __init__(self, cfg: RegenerateConfig, rank: int = 0):
        from transformers import GenerationConfig

        device = cfg.device or default_device()
        if device == "cuda" and torch.cuda.device_count() > 1:
            device = f"cuda:{rank % torch.cuda.device_count()}"   # one GPU per process under accelerate launch
        self.target = load_target(cfg.target, generation_dtype(cfg.dtype, device), device=device)
        self.tokenizer = self.target.tokenizer
        if not getattr(self.tokenizer, "chat_template", None):
            raise DraftsmithError("The target's tokenizer has no chat template, so it cannot be given turns",
                                  cfg.target, "Regenerate with an instruct/chat target")
        model = self.target.model
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.stop_ids = sorted(set(eos))
        if not self.stop_ids:
            raise DraftsmithError("The target declares no end-of-turn token, so answers would never end", cfg.target,
                                  "Set eos_token_id in the model's generation_config.json")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        context = self.target.max_length - cfg.max_new_tokens
        self.max_prompt = min(cfg.max_prompt_tokens or context, context)
        if self.max_prompt < 1:
            raise DraftsmithError("--max-new-tokens leaves no room for a prompt in the target's context",
                                  {"max_new_tokens": cfg.max_new_tokens, "context": self.target.max_length})
        sample = cfg.temperature > 0
        self.generation = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, do_sample=sample, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            **({"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0} if sample else {}))
        typical = min(self.max_prompt, 2048) + cfg.max_new_tokens
        self.batch_size = cfg.batch_size or default_batch_size(model, typical)
        self.parallelism = self.batch_size
        self.cfg = cfg

    def describe(self) -> dict:
        return {"engine": "builtin", "device": str(self.target.device), "dtype": str(self.target.dtype).removeprefix("torch."),
                "batch_size": self.batch_size, "stop_ids": self.stop_ids}

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template writes every special token itself
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def run(self, dialogues: list[Dialogue], progress, first_index: int = 0) -> None:
        """Answer every turn of `dialogues`; progress(answers, new_tokens) after each batch."""
        queue = deque(dialogues)
        while queue:
            batch = []
            while queue and len(batch) < self.batch_size:
                d = queue.popleft()
                messages = d.prompt()
                if messages is None:
                    continue
                ids = self.prompt_ids(messages)
                if len(ids) > self.max_prompt:
                    progress(d.remaining_turns(), 0)
                    d.stop("context")
                    continue
                batch.append((d, ids))
            if not batch:
                continue
            answers = self.generate([ids for _, ids in batch])
            for (d, _), (text, truncated, n) in zip(batch, answers):
                d.answer(text, truncated, n)
                if d.stopped is not None:
                    progress(d.remaining_turns(), 0)   # turns it will not reach count as done for the ETA
                queue.append(d)
            progress(len(batch), sum(n for _, _, n in answers))

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> list[tuple[str, bool, int]]:
        """(text, truncated, new tokens incl. the end-of-turn one) per prompt, left-padded in one batch."""
        model = self.target.model
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(p)
            attention[i, length - len(p):] = 1
        out = model.generate(input_ids=ids.to(self.target.device), attention_mask=attention.to(self.target.device),
                             generation_config=self.generation)
        results = []
        stops = torch.tensor(self.stop_ids, device=out.device)
        for row in out[:, length:]:
            ended = torch.isin(row, stops).nonzero()
            n = int(ended[0]) if len(ended) else len(row)
            text = self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
            results.append((text, not len(ended), n + bool(len(ended))))
        return results
