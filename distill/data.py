"""Conversations → token ids + a loss mask on the assistant's tokens.

A drafter learns to predict what the target says, so only the assistant turns carry loss;
the system prompt, the user turns and the template's role headers are context. The mask is
found from the tokenizer's own chat template, with no `{% generation %}` markers needed:
the template is rendered on growing prefixes of the conversation, and the characters each
assistant turn adds are mapped to tokens through the fast tokenizer's offsets.

`loss_mask[t] = 1` means token t is a token to learn (aligned with `input_ids`, not
shifted): the trainer compares logits at t − 1 with token t where `loss_mask[t]` is 1.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from jinja2 import TemplateError

from draftsmith.errors import DraftsmithError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1
"""Bump when the masking rule or the stored columns change, so old caches are not reused."""
_ENCODE_BATCH = 512
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
}


# --------------------------------------------------------------------------- normalising


def normalize_conversation(record: object, skips: Counter | None = None) -> list[dict] | None:
    """A raw record as OpenAI messages [{"role", "content"}, ...], or None when malformed.

    Accepts `{"messages": [{"role": "system"|"user"|"assistant", "content": str}]}` or ShareGPT
    `{"conversations": [{"from": "human"|"user"|"gpt"|"chatgpt"|"assistant"|"system",
    "value": str}]}`. A malformed record (unknown role, empty or non-string text, no assistant
    turn) gives None and adds its reason to `skips`.

    Assistant turns before the first user turn are dropped (nothing prompted them, and a
    template that injects a default system prompt, like SmolLM2's, does not render them
    prefix-stably); trailing non-assistant turns are dropped (they carry no loss).
    """
    turns, role_key, text_key, roles = _raw_turns(record)
    if turns is None:
        return _skip(skips, "no messages or conversations list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return _skip(skips, "turn is not an object")
        role = roles.get(turn.get(role_key))
        if role is None:
            return _skip(skips, f"unknown role {str(turn.get(role_key))[:20]!r}")
        text = turn.get(text_key)
        if not isinstance(text, str):
            return _skip(skips, "non-string text")
        if not text.strip():
            return _skip(skips, "empty text")
        messages.append({"role": role, "content": text})
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    messages = [m for i, m in enumerate(messages) if i >= first_user or m["role"] != "assistant"]
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        return _skip(skips, "no assistant turn")
    return messages


def _raw_turns(record: object) -> tuple[list | None, str, str, dict]:
    if isinstance(record, dict):
        if isinstance(record.get("messages"), list):
            return record["messages"], "role", "content", {r: r for r in _ROLES}
        if isinstance(record.get("conversations"), list):
            return record["conversations"], "from", "value", _SHAREGPT_ROLES
    return None, "", "", {}


def _skip(skips: Counter | None, reason: str) -> None:
    if skips is not None:
        skips[reason] += 1
    return None


def log_skips(what: str, kept: int, skips: Counter) -> None:
    """Print kept / skipped counts with the reasons, always: dropped rows must never go unnoticed."""
    reasons = ", ".join(f"{reason}: {n}" for reason, n in skips.most_common())
    print(f"[draftsmith] {what}: kept {kept}, skipped {sum(skips.values())}" + (f" ({reasons})" if skips else ""),
          flush=True)


# --------------------------------------------------------------------------- masking


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and, per assistant turn, (content_start, content_end, turn_end).

    Character offsets into the rendered text. Turn i's content starts where the rendering of
    messages[:i] with the generation prompt ends, and its turn ends where the rendering of
    messages[:i+1] ends; both renderings must be prefixes of the full one ("prefix-stable"),
    otherwise the template rewrites earlier turns and there is no honest span to mask.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DraftsmithError(
            "the tokenizer has no chat template, so assistant turns cannot be located",
            seen=getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
            fix="Use an instruct/chat tokenizer, or set tokenizer.chat_template first",
        )
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        after = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(after) and len(before) <= len(after)):
            raise DraftsmithError(
                "the chat template is not prefix-stable: rendering the first turns of a "
                "conversation does not give a prefix of rendering all of it",
                seen={"turn": i, "prefix": before[-80:], "full": text[len(before) - 80:][:160]},
                fix="Use a template that renders earlier turns the same whatever follows "
                "(e.g. plain ChatML), or pre-render the conversations yourself",
            )
        content = message["content"]
        start = len(before) if after.startswith(content, len(before)) else -1
        if start < 0:  # templates that trim the content
            content = content.strip()
            start = after.find(content, len(before))
        if start < 0:
            raise DraftsmithError(
                "the chat template changes assistant text, so it cannot be located",
                seen={"turn": i, "content": content[:80], "rendered": after[len(before):][:80]},
                fix="Use a template that renders assistant content verbatim",
            )
        spans.append((start, start + len(content), len(after)))
    return text, spans


def end_of_turn_ids(tokenizer) -> frozenset[int]:
    """The special tokens that end a masked span (<|im_end|>, <end_of_turn>, EOS, ...)."""
    special = set(tokenizer.all_special_ids)
    special.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return frozenset(special)


def mask_from_offsets(
    offsets: list[tuple[int, int]],
    input_ids: list[int],
    spans: list[tuple[int, int, int]],
    end_of_turn_ids: Iterable[int],
) -> list[int]:
    """1 on tokens overlapping an assistant content span, and on the end-of-turn token.

    A token straddling a content boundary counts as content (it partly predicts content).
    The end-of-turn token is the first token after the content, when it lies inside the
    assistant turn and is a special token (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3):
    it is what the target emits to stop, so the drafter must learn to propose it. Template
    text after it (ChatML's trailing "\\n") is never generated, so it gets no loss.
    """
    ends = [b for _, b in offsets]
    end_ids = set(end_of_turn_ids)
    mask = [0] * len(input_ids)
    for start, stop, turn_end in spans:
        j = bisect.bisect_right(ends, start)
        while j < len(offsets) and offsets[j][0] < stop:
            mask[j] = 1
            j += 1
        if j < len(offsets) and offsets[j][0] < turn_end and input_ids[j] in end_ids:
            mask[j] = 1
    return mask


def _encode(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise DraftsmithError(
            "a fast (Rust) tokenizer is needed for character offsets",
            seen=type(tokenizer).__name__,
            fix="Load the tokenizer with AutoTokenizer.from_pretrained(..., use_fast=True)",
        )
    # The template already writes every special token, so the tokenizer must add none.
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [(ids, [tuple(o) for o in offs]) for ids, offs in zip(enc["input_ids"],
                                                                   enc["offset_mapping"])]


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict:
    """{"input_ids": [...], "loss_mask": [...]} for one conversation, cut to max_length tokens.

    The loss mask is 1 exactly on assistant content tokens and the end-of-turn token that
    closes each assistant turn (see `mask_from_offsets`), 0 elsewhere.
    """
    text, spans = assistant_spans(tokenizer, messages)
    ((ids, offsets),) = _encode(tokenizer, [text])
    mask = mask_from_offsets(offsets, ids, spans, end_of_turn_ids(tokenizer))
    return {"input_ids": ids[:max_length], "loss_mask": mask[:max_length]}


# --------------------------------------------------------------------------- datasets


def pack_sequences(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples and cut the stream into rows of max_length tokens (last one shorter).

    `build_dataset(packing=True)` packs whole conversations: none is truncated first.

    Rows then hold several conversations that attend to each other (plain concat-and-chunk,
    no per-document attention mask); no padding is wasted. Rows without a masked token are
    dropped.
    """
    ids: list[int] = []
    mask: list[int] = []
    for example in examples:
        ids.extend(example["input_ids"])
        mask.extend(example["loss_mask"])
    rows = []
    for start in range(0, len(ids), max_length):
        chunk = mask[start : start + max_length]
        if any(chunk):
            rows.append({"input_ids": ids[start : start + max_length], "loss_mask": chunk})
    return rows


def _encode_all(conversations: list, tokenizer, max_length: int | None, skips: Counter
                ) -> list[dict]:
    end_ids = end_of_turn_ids(tokenizer)
    rendered: list[tuple[str, list]] = []
    for record in conversations:
        messages = normalize_conversation(_as_record(record), skips)
        if messages is None:
            continue
        try:
            rendered.append(assistant_spans(tokenizer, messages))
        except (TemplateError, ValueError) as err:  # the template rejects it (e.g. role order)
            skips[f"template error: {str(err)[:60]}"] += 1
    examples = []
    for b in range(0, len(rendered), _ENCODE_BATCH):
        batch = rendered[b : b + _ENCODE_BATCH]
        for (_, spans), (ids, offsets) in zip(batch, _encode(tokenizer, [t for t, _ in batch])):
            mask = mask_from_offsets(offsets, ids, spans, end_ids)[:max_length]
            if not any(mask):
                skips["no assistant token within max_length"] += 1
                continue
            examples.append({"input_ids": ids[:max_length], "loss_mask": mask})
    return examples


def _as_record(record: object) -> object:
    """A loaded conversation {"id", "messages"} or a raw record; a bare message list too."""
    return {"messages": record} if isinstance(record, list) else record


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what decides a conversation's rows: the vocabulary, the chat template and the
    end-of-turn ids (not the EOS or pad choice, which transformers versions set differently for the
    same GGUF)."""
    meta = {"vocab": sorted(tokenizer.get_vocab().items()), "template": tokenizer.chat_template,
            "end_of_turn": sorted(end_of_turn_ids(tokenizer))}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]


def dataset_fingerprint(conversations: list, tokenizer, max_length: int, packing: bool) -> str:
    """sha256 over what decides the tokenized rows: data, tokenizer, template, length, packing."""
    h = hashlib.sha256()
    meta = {
        "version": _CACHE_VERSION,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "class": type(tokenizer).__name__,
        "rows": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "packing": packing,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for record in conversations:
        h.update(json.dumps(record, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:20]


def build_dataset(
    conversations: list,
    tokenizer,
    max_length: int,
    cache_dir: str | Path | None = None,
    packing: bool = False,
) -> datasets.Dataset:
    """A `datasets.Dataset` with columns input_ids and loss_mask, cached under cache_dir.

    `conversations` are loaded records ({"id", "messages"}), raw OpenAI/ShareGPT records or
    message lists. The cache folder is named by `dataset_fingerprint`, so a second call with
    the same inputs loads it from disk without tokenizing. Skip counts are logged.
    """
    import datasets   # imported where a Dataset is built or loaded: prepared data trains without it

    if max_length < 2:
        raise DraftsmithError("max_length must be at least 2 tokens", seen=max_length)
    path = None
    if cache_dir is not None:
        key = dataset_fingerprint(conversations, tokenizer, max_length, packing)
        path = Path(cache_dir) / f"tokenized-{key}"
        if path.is_dir():
            logger.info("loading the tokenized dataset from cache %s", path)
            return datasets.load_from_disk(str(path))
    skips: Counter = Counter()
    # Packing splits a long conversation across rows instead of cutting its tail off.
    examples = _encode_all(conversations, tokenizer, None if packing else max_length, skips)
    log_skips("tokenized conversations", len(examples), skips)
    if packing:
        examples = pack_sequences(examples, max_length)
        logger.info("packed into %d rows of up to %d tokens", len(examples), max_length)
    if not examples:
        raise DraftsmithError(
            "no conversation gave any assistant token to train on",
            seen=dict(skips),
            fix="Check the data's format (OpenAI messages or ShareGPT conversations) and max_length",
        )
    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32")),
         "loss_mask": datasets.Sequence(datasets.Value("int8"))}
    )
    dataset = datasets.Dataset.from_list(examples, features=features)
    if path is not None:
        _save_atomically(dataset, path)
    return dataset


def _save_atomically(dataset: datasets.Dataset, path: Path) -> None:
    """Write beside the target and rename, so a crash or a second process never sees half a cache."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached the tokenized dataset at %s", path)
