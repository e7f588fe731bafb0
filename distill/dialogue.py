"""What `draftsmith data regenerate` (distill/regenerate.py) and its engines (distill/local_engine.py,
distill/endpoint.py) share: the run's settings and one conversation under regeneration."""

from __future__ import annotations

from dataclasses import dataclass, field

from draftsmith.errors import DraftsmithError

_ROLE_TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


@dataclass
class RegenerateConfig:
    target: str
    """Asset name, transformers folder, .gguf file or hub id (the endpoint engine loads its tokenizer only)."""
    source: str
    """Conversations: sharegpt, a .jsonl file, a saved dataset folder (as data.source)."""
    out: str
    """Output folder; a second run with the same plan resumes it."""
    max_conversations: int | None = None
    """Regenerate the first N conversations of the source; null = all."""
    max_new_tokens: int = 512
    """Tokens per answer; an answer that reaches it is marked truncated."""
    max_prompt_tokens: int | None = None
    """Stop a conversation once its next prompt is longer (set it near the recipe's data.max_length:
    turns past it are never trained on); null = the target's context minus max_new_tokens."""
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    seed: int = 0
    """Sampling seed: shard s starts from seed + s (the endpoint engine sends seed + conversation index)."""
    shard_size: int | None = None
    """Conversations per shard (the unit of resumption); null = 8 x the batch size (concurrency)."""
    batch_size: int | None = None
    """Built-in engine: sequences per generate call; null = chosen from free GPU memory (8 on CPU)."""
    dtype: str = "auto"
    """Built-in engine: auto = bf16 on CUDA where supported (else fp16), fp32 on CPU."""
    device: str | None = None
    endpoint: str | None = None
    """URL of an OpenAI-compatible server (vLLM, SGLang, transformers serve); null = built-in engine."""
    model: str | None = None
    """Endpoint: the served model's name; null = the only model the server lists."""
    concurrency: int = 8
    """Endpoint: conversations in flight."""
    timeout: float = 600.0
    """Endpoint: seconds per request."""
    retries: int = 3
    """Endpoint: further tries of a request that failed with a timeout, a lost connection or HTTP 429/5xx."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        positive = {"max_new_tokens": self.max_new_tokens, "concurrency": self.concurrency,
                    "timeout": self.timeout, "max_conversations": self.max_conversations,
                    "shard_size": self.shard_size, "batch_size": self.batch_size,
                    "max_prompt_tokens": self.max_prompt_tokens}
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise DraftsmithError(f"--{name.replace('_', '-')} must be positive", value)
        # written as ranges so that NaN (every comparison false) and infinity fail them too
        if not 0 <= self.temperature < float("inf") or not 0 < self.top_p <= 1 or self.retries < 0:
            raise DraftsmithError("invalid sampling or retry settings",
                                  {"temperature": self.temperature, "top_p": self.top_p, "retries": self.retries},
                                  "Use a finite --temperature >= 0 (0 = greedy), --top-p in (0, 1], --retries >= 0")


@dataclass
class Dialogue:
    """One conversation under regeneration: the source's system and user turns, the target's answers."""

    id: str
    source: list[dict]
    messages: list[dict] = field(default_factory=list)
    pos: int = 0
    truncated: bool = False
    stopped: str | None = None
    new_tokens: int = 0
    answers: int = 0

    def prompt(self) -> list[dict] | None:
        """The messages the target answers next: every source turn up to the source's next answer,
        after the target's own earlier answers; None when the conversation is finished."""
        if self.stopped is not None:
            return None
        while self.pos < len(self.source) and self.source[self.pos]["role"] != "assistant":
            self.messages.append(self.source[self.pos])
            self.pos += 1
        if self.pos >= len(self.source):
            self.stopped = "end"
            return None
        return list(self.messages)

    def answer(self, text: str, truncated: bool, new_tokens: int) -> None:
        self.new_tokens += new_tokens
        self.pos += 1
        while self.pos < len(self.source) and self.source[self.pos]["role"] == "assistant":
            self.pos += 1          # consecutive source answers: the target answers once
        if not text.strip():       # nothing to learn, and ShareGPT readers reject empty turns
            self.stop("empty")
            return
        self.messages.append({"role": "assistant", "content": text})
        self.answers += 1
        if truncated:
            self.truncated = True
            self.stop("truncated")

    def stop(self, why: str) -> None:
        self.stopped = why

    def remaining_turns(self) -> int:
        """Answers the source still asks for (the turn a stopped prompt was for included)."""
        return answer_turns(self.source[self.pos:])

    def record(self) -> dict | None:
        """The ShareGPT record, or None when the target gave no answer."""
        messages = list(self.messages)
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if not messages:
            return None
        return {"id": self.id, "conversations": [{"from": _ROLE_TO_SHAREGPT[m["role"]], "value": m["content"]}
                                                 for m in messages], "truncated": self.truncated}


def answer_turns(messages: list[dict]) -> int:
    """How many answers regeneration asks for: one per run of source assistant turns."""
    return sum(m["role"] == "assistant" and (i == 0 or messages[i - 1]["role"] != "assistant")
               for i, m in enumerate(messages))
