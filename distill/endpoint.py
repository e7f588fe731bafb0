"""The server regeneration engine: any OpenAI-compatible chat-completions server (vLLM, SGLang,
`transformers serve`) answers, several conversations in flight on threads.

Before any work the engine checks that the server is the target: the model it is asked for must be
one `/v1/models` lists, and a probe request must count as many prompt tokens as the target's own
tokenizer and chat template do (another model, tokenizer or template counts differently). Requests
time out; a timeout, a lost connection or HTTP 429/5xx is retried a bounded number of times with
exponential back-off, anything else fails at once with the server's message.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

from draftsmith import assets
from draftsmith.distill.dialogue import Dialogue, RegenerateConfig
from draftsmith.errors import DraftsmithError
from draftsmith.models.target import resolve_model_folder

_START_SERVER = ("Start the server (vllm serve MODEL, python -m sglang.launch_server --model-path MODEL, or "
                 "transformers serve MODEL) and pass its address, e.g. --endpoint http://localhost:8000")
_PROBE = [{"role": "user", "content": "Say hello in five words."}]


class ChatClient:
    """A few calls of the OpenAI HTTP API over urllib (no client library needed)."""

    def __init__(self, url: str, timeout: float, retries: int, backoff: float = 1.0):
        base = url.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        example = "e.g. --endpoint http://localhost:8000 or http://[::1]:8000"
        if not self.base.startswith(("http://", "https://")):
            raise DraftsmithError("--endpoint must be an http(s) URL", url, example)
        try:    # urllib would raise these on the first request, as tracebacks
            parts = urllib.parse.urlsplit(self.base)
            host, _ = parts.hostname, parts.port
        except ValueError as e:
            raise DraftsmithError(f"--endpoint is not a valid URL ({e})", url, example) from None
        if not host:
            raise DraftsmithError("--endpoint names no host", url, example)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        key = os.environ.get("OPENAI_API_KEY")     # what vLLM's --api-key and the openai client use
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def request(self, path: str, body: dict | None = None) -> dict:
        url = f"{self.base}/v1{path}"
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(30.0, self.backoff * 2 ** (attempt - 1)))
            try:
                req = urllib.request.Request(url, data=data, headers=self.headers, method="GET" if data is None else "POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = err.read()[:600].decode("utf-8", "replace")
                if err.code not in (408, 429) and err.code < 500:
                    raise DraftsmithError(f"The server refused the request (HTTP {err.code})", f"{url}: {detail}",
                                          "Check --model and the server's limits (context length, max_tokens)") from None
                last = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                    TimeoutError, json.JSONDecodeError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        raise DraftsmithError("The chat-completions server did not answer", f"{url}: {last} "
                              f"({self.retries + 1} tries, {self.timeout:g} s each)", _START_SERVER)

    def models(self) -> list[str]:
        listed = self.request("/models")
        try:
            return [m["id"] for m in listed["data"]]
        except (KeyError, TypeError):
            raise DraftsmithError("The server's /v1/models answer is not an OpenAI model list", str(listed)[:300],
                                  "Point --endpoint at an OpenAI-compatible server") from None


def load_tokenizer(target: str):
    """The target's tokenizer and chat template, without its weights."""
    from transformers import AutoTokenizer

    folder, _ = resolve_model_folder(target)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    asset = assets.TARGETS.get(target)
    if asset is not None and asset.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = asset.chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise DraftsmithError("The target's tokenizer has no chat template, so it cannot be given turns", target,
                              "Regenerate with an instruct/chat target")
    return tokenizer, folder


class EndpointEngine:
    def __init__(self, cfg: RegenerateConfig):
        from transformers import AutoConfig

        self.cfg = cfg
        self.client = ChatClient(cfg.endpoint, cfg.timeout, cfg.retries)
        served = self.client.models()
        if cfg.model is None and len(served) != 1:
            raise DraftsmithError("The server lists several models (or none); say which is the target",
                                  served, "Pass --model NAME")
        self.model = cfg.model or served[0]
        if self.model not in served:
            raise DraftsmithError("The server serves another model than the one asked for",
                                  f"asked for {self.model!r}, the server lists {served}",
                                  "Serve the target, or pass --model with one of the listed names")
        self.tokenizer, folder = load_tokenizer(cfg.target)
        self._lock = threading.Lock()          # a fast tokenizer is not safe to share between threads
        config = AutoConfig.from_pretrained(folder)
        context = (getattr(config, "max_position_embeddings", None) or 1 << 30) - cfg.max_new_tokens
        self.max_prompt = min(cfg.max_prompt_tokens or context, context)
        self.parallelism = cfg.concurrency
        self.check_tokenizer()

    def describe(self) -> dict:
        return {"engine": "endpoint", "url": self.client.base, "model": self.model, "concurrency": self.parallelism,
                "timeout_s": self.cfg.timeout, "retries": self.cfg.retries}

    def count(self, messages: list[dict]) -> int:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        with self._lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_tokenizer(self) -> None:
        """One short request: the server must count the prompt's tokens as the target does."""
        response = self.client.request("/chat/completions", {"model": self.model, "messages": _PROBE, "max_tokens": 1,
                                                             "temperature": 0.0})
        self._check_model(response)
        served = (response.get("usage") or {}).get("prompt_tokens")
        mine = self.count(_PROBE)
        if served is None:
            print("[draftsmith] the server reports no token usage: its tokenizer cannot be checked", flush=True)
        elif served != mine:
            raise DraftsmithError("The server's model tokenizes the prompt differently from the target: it runs "
                                  "another model, tokenizer or chat template",
                                  {"model": self.model, "server prompt tokens": served, "target prompt tokens": mine},
                                  "Serve the target itself (same weights, tokenizer and chat template), or pass the "
                                  "--target the server runs")

    def _check_model(self, response: dict) -> None:
        model = response.get("model")
        if model is not None and model != self.model:
            raise DraftsmithError("The server answered with another model than the one asked for",
                                  {"asked": self.model, "answered": model}, "Serve the target, or fix --model")

    def chat(self, messages: list[dict], seed: int) -> tuple[str, bool, int]:
        """(text, truncated, new tokens) of one answer."""
        body = {"model": self.model, "messages": messages, "max_tokens": self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature}
        if self.cfg.temperature > 0:
            body.update(top_p=self.cfg.top_p, seed=seed)
        response = self.client.request("/chat/completions", body)
        self._check_model(response)
        try:
            choice = response["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise DraftsmithError("The server's answer is not a chat completion", str(response)[:300],
                                  "Point --endpoint at an OpenAI-compatible chat-completions server") from None
        new = (response.get("usage") or {}).get("completion_tokens")
        if new is None:
            with self._lock:
                new = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return text, choice.get("finish_reason") == "length", int(new)

    def run(self, dialogues: list[Dialogue], progress, first_index: int = 0) -> None:
        """Answer every turn of `dialogues`, `concurrency` conversations at a time."""
        failed = threading.Event()
        report = threading.Lock()

        def converse(index: int, d: Dialogue) -> None:
            turn = 0
            while not failed.is_set() and (messages := d.prompt()) is not None:
                if self.count(messages) > self.max_prompt:
                    d.stop("context")
                else:
                    seed = ((self.cfg.seed * 1_000_003 + index) * 1024 + turn) % 2**31
                    text, truncated, n = self.chat(messages, seed)
                    d.answer(text, truncated, n)
                    turn += 1
                    with report:
                        progress(1, n)
                if d.stopped is not None:
                    with report:
                        progress(d.remaining_turns(), 0)

        with ThreadPoolExecutor(self.parallelism, thread_name_prefix="regenerate") as pool:
            futures = [pool.submit(converse, first_index + i, d) for i, d in enumerate(dialogues)]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                failed.set()               # the other threads stop after their request in flight
                for future in futures:
                    future.cancel()
                raise
