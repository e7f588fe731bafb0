"""Evaluation prompts: named benchmarks or a user's .jsonl file, as lists of user turns.

Everything the harness needs from a benchmark is the user messages in order; which chat
template wraps them, and how a second turn is prompted with the model's own first answer,
is the harness's business. Keeping this module to "prompts in, `BenchItem`s out" lets one
loader serve MT-bench, HumanEval, held-out ShareGPT and any custom file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from draftsmith import assets
from draftsmith.errors import DraftsmithError
from draftsmith.splits import is_heldout

BENCH_NAMES = ("mt_bench", "humaneval", "sharegpt-heldout")

_JSONL_SHAPES = (
    '{"prompt": str}',
    '{"turns": [str, ...]}',
    '{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}',
    '{"conversations": [{"from": "human"|"gpt", "value": str}, ...]}',
)
_HUMAN_SPEAKERS = ("human", "user")


@dataclass
class BenchItem:
    """One evaluation prompt: its user turns in order."""

    id: str
    turns: list[str]
    """The user messages, in order; assistant replies are generated, never taken from data."""
    category: str | None
    bench: str
    """The benchmark name, or the .jsonl file's stem."""


def load_bench(name: str, num_prompts: int | None = None, turns: int = 1) -> list[BenchItem]:
    """Load a benchmark by name (see BENCH_NAMES) or from a path to a .jsonl file.

    Each item keeps its first `turns` user turns; items with fewer turns are skipped (a
    two-turn run wants two-turn prompts). `num_prompts` then keeps the first N items.
    """
    if turns < 1:
        raise DraftsmithError("turns must be at least 1", seen=turns, fix="Use turns=1 or turns=2")
    if num_prompts is not None and num_prompts < 1:
        raise DraftsmithError(
            "num_prompts must be at least 1",
            seen=num_prompts,
            fix="Give a positive count, or none for all prompts",
        )
    items = _load_all(name)
    kept = [
        BenchItem(item.id, item.turns[:turns], item.category, item.bench)
        for item in items
        if len(item.turns) >= turns
    ]
    if not kept:
        most = max((len(item.turns) for item in items), default=0)
        raise DraftsmithError(
            f"the benchmark {name!r} has no prompts with {turns} user turn(s)",
            seen=f"{len(items)} items, at most {most} turn(s) each",
            fix="Lower `turns`, or use a benchmark with multi-turn prompts such as mt_bench",
        )
    return kept[:num_prompts]


def _load_all(name: str) -> list[BenchItem]:
    if name == "mt_bench":
        return [
            BenchItem(str(q["question_id"]), list(q["turns"]), q["category"], name)
            for q in assets.load_mt_bench()
        ]
    if name == "humaneval":
        return [BenchItem(p["task_id"], [p["prompt"]], None, name) for p in assets.load_humaneval()]
    if name == "sharegpt-heldout":
        return _sharegpt_heldout()
    if name.endswith(".jsonl"):
        return _load_jsonl(Path(name))
    raise DraftsmithError(
        "unknown benchmark",
        seen=name,
        fix=f"Use one of {', '.join(BENCH_NAMES)}, or a path to a .jsonl file",
    )


def _sharegpt_heldout() -> list[BenchItem]:
    """The first human message of each held-out ShareGPT conversation (never trained on)."""
    items = []
    for record in assets.load_sharegpt():
        if not is_heldout(record["id"]):
            continue
        conversation = record.get("conversations") or []
        first = conversation[0] if conversation else {}
        text = first.get("value")
        from_human = first.get("from") in _HUMAN_SPEAKERS
        if not from_human or not isinstance(text, str) or not text.strip():
            continue
        items.append(BenchItem(record["id"], [text], None, "sharegpt-heldout"))
    return items


# --------------------------------------------------------------------------- .jsonl files


class _BadLine(Exception):
    """What is wrong with one line; `_load_jsonl` adds the file and line number."""


def _load_jsonl(path: Path) -> list[BenchItem]:
    if not path.is_file():
        raise DraftsmithError(
            "benchmark file not found",
            seen=str(path),
            fix=f"Check the path, or use one of {', '.join(BENCH_NAMES)}",
        )
    items = []
    with path.open("rb") as f:   # bytes, decoded line by line: a binary file is refused naming its line
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DraftsmithError(f"{path}, line {line_no}: not UTF-8 text (is this a binary file?)",
                                      seen=raw[:40], fix="Give a .jsonl text file: one JSON object per line, "
                                      "of one of these shapes: " + "; ".join(_JSONL_SHAPES)) from None
            if not line.strip():
                continue
            try:
                item = _parse_line(line, default_id=f"{path.stem}-{line_no}", bench=path.stem)
            except _BadLine as err:
                raise DraftsmithError(
                    f"{path}, line {line_no}: {err}",
                    seen=line.strip()[:120],
                    fix="Each line must be a JSON object of one of these shapes: "
                    + "; ".join(_JSONL_SHAPES)
                    + ' (optional "id" and "category")',
                ) from None
            items.append(item)
    return items


def _parse_line(line: str, default_id: str, bench: str) -> BenchItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadLine(f"not valid JSON ({err.msg})") from None
    except RecursionError:
        raise _BadLine("not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise _BadLine(f"expected a JSON object, found {type(obj).__name__}")
    shapes = [key for key in ("prompt", "turns", "messages", "conversations") if key in obj]
    if len(shapes) != 1:
        found = shapes or "none"
        raise _BadLine(f"expected exactly one of prompt/turns/messages/conversations, found {found}")
    turns = _TURN_READERS[shapes[0]](obj[shapes[0]])
    if not turns:
        raise _BadLine(f"{shapes[0]!r} holds no user message")
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, str) or not turn.strip():
            raise _BadLine(f"user turn {i} must be a non-empty string")
    category = obj.get("category")
    category = None if category is None else str(category)
    return BenchItem(str(obj.get("id", default_id)), turns, category, bench)


def _turns_from_prompt(value: object) -> list:
    return [value]


def _turns_from_list(value: object) -> list:
    if not isinstance(value, list):
        raise _BadLine(f"'turns' must be a list of strings, found {type(value).__name__}")
    return value


def _user_values(
    value: object, shape: str, speaker_key: str, text_key: str, speakers: tuple[str, ...]
) -> list:
    """The texts of the user's messages in a list of message objects (system prompts dropped)."""
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise _BadLine(f"{shape!r} must be a list of objects")
    for i, message in enumerate(value, start=1):
        if speaker_key not in message or text_key not in message:
            raise _BadLine(f"message {i} of {shape!r} needs {speaker_key!r} and {text_key!r}")
    return [m[text_key] for m in value if m[speaker_key] in speakers]


_TURN_READERS = {
    "prompt": _turns_from_prompt,
    "turns": _turns_from_list,
    "messages": lambda v: _user_values(v, "messages", "role", "content", ("user",)),
    "conversations": lambda v: _user_values(v, "conversations", "from", "value", _HUMAN_SPEAKERS),
}


# --------------------------------------------------------------------------- lengths


def check_prompt_lengths(items: list[BenchItem], encode, context: int, max_new_tokens: int) -> int:
    """Refuse, before anything is generated, every prompt that cannot fit the target's context; return the
    longest sequence a turn may reach (prompt + max_new_tokens, later turns' earlier answers at their longest).

    `encode(turns, answers)` gives a turn's prompt ids. A later turn's prompt holds the earlier answers,
    which do not exist yet: each is counted at its longest, max_new_tokens (a bound; the harness still
    checks the real prompt). Refusing rather than skipping keeps a benchmark's prompt set what its name
    says; the error lists the prompts so they can be dropped from a custom file.
    """
    too_long, longest = [], 0
    for index, item in enumerate(items, start=1):
        for turn in range(len(item.turns)):
            length = len(encode(item.turns[: turn + 1], [""] * turn)) + turn * max_new_tokens
            longest = max(longest, length + max_new_tokens)
            if length + max_new_tokens > context:
                too_long.append(f"prompt {index} (id {item.id!r}, turn {turn + 1}): {length} + {max_new_tokens}")
    if too_long:
        raise DraftsmithError(
            f"{len(too_long)} prompt(s) do not fit the target's context of {context} tokens with "
            f"max_new_tokens {max_new_tokens}; nothing was generated",
            seen="; ".join(too_long[:5]) + (f"; and {len(too_long) - 5} more" if len(too_long) > 5 else ""),
            fix="Drop those prompts from the benchmark file (or keep fewer with --num-prompts), "
            "or lower --max-new-tokens or --turns",
        )
    return longest
