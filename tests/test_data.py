"""distill/data.py against the chat template's own rendering, with a tiny offline tokenizer."""

import json
import logging
import random
from collections import Counter

import datasets
import pytest

from draftsmith import splits
from draftsmith.distill import data, sources
from draftsmith.errors import DraftsmithError
from draftsmith.splits import is_heldout
from tiny import make_tiny_tokenizer

END = "<|im_end|>"

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Japan? 日本"},
    {"role": "assistant", "content": " Tokyo — 東京.\n\nassistant\n<not special>  "},
]


def _runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive masked tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture
def tok():
    return make_tiny_tokenizer()


def test_tiny_tokenizer_is_byte_level_chatml(tok):
    assert len(tok) <= 512
    text = "any text: ünïcödé 🚀\t\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.convert_tokens_to_ids(["<|im_start|>", END]) == [1, 2]


@pytest.mark.parametrize("with_system", [False, True])
def test_mask_is_exactly_assistant_content_and_end_of_turn(tok, with_system):
    messages = ([{"role": "system", "content": "Be brief."}] if with_system else []) + TWO_TURNS
    out = data.tokenize_conversation(tok, messages, max_length=10_000)
    ids, mask = out["input_ids"], out["loss_mask"]
    # The ids are the template's own tokenization.
    assert ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(run) for run in _runs(ids, mask)] == [c + END for c in assistant]
    # Everything else (system prompt, user turns, headers, the "\n" after <|im_end|>) is context.
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert ("Be brief." in context) == with_system
    assert ("SmolLM" in context) != with_system  # the template's default system prompt
    assert "Paris" not in context and "Japan" in context


def test_truncation_keeps_a_prefix(tok):
    full = data.tokenize_conversation(tok, TWO_TURNS, max_length=10_000)
    n = len(full["input_ids"]) - 7
    cut = data.tokenize_conversation(tok, TWO_TURNS, max_length=n)
    assert cut["input_ids"] == full["input_ids"][:n]
    assert cut["loss_mask"] == full["loss_mask"][:n]


def test_template_that_trims_content(tok):
    tok.chat_template = tok.chat_template.replace("message['content']", "message['content'] | trim")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  Hello!\n"}]
    out = data.tokenize_conversation(tok, messages, max_length=1000)
    assert [tok.decode(r) for r in _runs(out["input_ids"], out["loss_mask"])] == ["Hello!" + END]


def test_prefix_unstable_template_fails_clearly(tok):
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}[final]{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DraftsmithError, match="prefix-stable"):
        data.tokenize_conversation(tok, TWO_TURNS, max_length=1000)


def test_conversations_the_template_rejects_are_skipped(tok, capsys):
    tok.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
        "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    twice = [TWO_TURNS[0], TWO_TURNS[0], TWO_TURNS[1]]
    ds = data.build_dataset([TWO_TURNS, twice], tok, max_length=256)
    assert len(ds) == 1 and "template error: roles must alternate: 1" in capsys.readouterr().out


def test_missing_chat_template_fails_clearly(tok):
    tok.chat_template = None
    with pytest.raises(DraftsmithError, match="chat template"):
        data.tokenize_conversation(tok, TWO_TURNS, max_length=1000)


# --------------------------------------------------------------------------- normalising


def test_normalize_openai_and_sharegpt():
    sharegpt = {"conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "u1"},
        {"from": "gpt", "value": "a1"}, {"from": "user", "value": "u2"},
        {"from": "chatgpt", "value": "a2"}, {"from": "human", "value": "trailing"},
    ]}
    expected = [("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"),
                ("assistant", "a2")]
    got = data.normalize_conversation(sharegpt)
    assert [(m["role"], m["content"]) for m in got] == expected
    openai = {"messages": [{"role": r, "content": c} for r, c in expected]}
    assert data.normalize_conversation(openai) == got
    # An assistant turn before any user turn has no prompt: dropped, the system kept.
    early = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]
             + openai["messages"][1:]}
    assert data.normalize_conversation(early) == got


@pytest.mark.parametrize("record, reason", [
    ({"conversations": [{"from": "bing", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "unknown role 'bing'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "empty text"),
    ({"messages": [{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "a"}]},
     "non-string text"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "no prompt"}]}, "no assistant turn"),
    ({"text": "plain"}, "no messages or conversations list"),
    (None, "no messages or conversations list"),
    ({"messages": ["not a dict"]}, "turn is not an object"),
])
def test_malformed_rows_are_skipped_with_a_reason(record, reason):
    skips = Counter()
    assert data.normalize_conversation(record, skips) is None
    assert skips == Counter({reason: 1})


# --------------------------------------------------------------------------- datasets


def _records(n: int) -> list[dict]:
    return [
        {"id": f"c{i}", "messages": [
            {"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]}
        for i in range(n)
    ]


def test_build_dataset_skips_counts_and_columns(tok, capsys):
    bad = [{"messages": [{"role": "user", "content": "q"}]},
           {"conversations": [{"from": "bing", "value": "q"}]}]
    long = {"messages": [{"role": "user", "content": "word " * 200},
                         {"role": "assistant", "content": "cut off"}]}
    ds = data.build_dataset(_records(5) + bad + [long], tok, max_length=64)
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["input_ids", "loss_mask"]
    assert len(ds) == 5
    row = ds[0]
    assert [tok.decode(r) for r in _runs(row["input_ids"], row["loss_mask"])] == ["It is 0." + END]
    log = capsys.readouterr().out   # printed, not logged: dropped rows are never silent
    assert "kept 5, skipped 3" in log
    assert "no assistant turn: 1" in log and "unknown role 'bing': 1" in log
    assert "no assistant token within max_length: 1" in log


def test_build_dataset_reuses_its_disk_cache(tok, tmp_path, monkeypatch, caplog):
    records = _records(6)
    first = data.build_dataset(records, tok, max_length=64, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokenized-*"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the second call tokenized again")

    monkeypatch.setattr(data, "_encode_all", no_tokenizing)
    with caplog.at_level(logging.INFO, logger="draftsmith.distill.data"):
        second = data.build_dataset(records, make_tiny_tokenizer(), max_length=64, cache_dir=tmp_path)
    assert "from cache" in caplog.text
    assert second["input_ids"] == first["input_ids"] and second["loss_mask"] == first["loss_mask"]
    # Anything that changes the rows changes the key.
    for kwargs in ({"max_length": 32}, {"packing": True}):
        with pytest.raises(AssertionError, match="tokenized again"):
            data.build_dataset(records, tok, cache_dir=tmp_path, **{"max_length": 64, **kwargs})
    with pytest.raises(AssertionError, match="tokenized again"):
        data.build_dataset(records[:5], tok, max_length=64, cache_dir=tmp_path)
    tok.chat_template = tok.chat_template.replace("You are", "You're")
    with pytest.raises(AssertionError, match="tokenized again"):
        data.build_dataset(records, tok, max_length=64, cache_dir=tmp_path)


def test_packing_concatenates_then_splits(tok):
    records = _records(8)
    plain = data.build_dataset(records, tok, max_length=256)
    packed = data.build_dataset(records, tok, max_length=50, packing=True)
    ids = [i for row in plain["input_ids"] for i in row]
    mask = [m for row in plain["loss_mask"] for m in row]
    chunks = [(ids[s:s + 50], mask[s:s + 50]) for s in range(0, len(ids), 50)]
    expected = [c for c in chunks if any(c[1])]  # a chunk with nothing to learn is dropped
    assert list(zip(packed["input_ids"], packed["loss_mask"])) == expected
    assert sum(map(sum, packed["loss_mask"])) == sum(mask)
    assert len(plain["input_ids"][0]) > 50  # whole conversations were packed, none truncated


def test_pack_sequences_drops_rows_without_loss():
    examples = [{"input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 0, 0]},
                {"input_ids": [5, 6], "loss_mask": [0, 1]}]
    assert data.pack_sequences(examples, 3) == [{"input_ids": [4, 5, 6], "loss_mask": [0, 0, 1]}]


# --------------------------------------------------------------------------- sources and split


def test_load_conversations_from_jsonl(tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    lines = [
        json.dumps({"id": "a", "messages": TWO_TURNS}),
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}),
        "",
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    convs = sources.load_conversations(str(path))
    assert [c["id"] for c in convs] == ["a", "2"]
    assert convs[0]["messages"] == TWO_TURNS
    assert convs[1]["messages"] == [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "r"}]
    assert "kept 2, skipped 2 (not JSON: 1, no assistant turn: 1)" in capsys.readouterr().out


def test_load_conversations_from_saved_folder_and_sharegpt(tmp_path, monkeypatch):
    rows = [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[:1]}, {"messages": TWO_TURNS}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    convs = sources.load_conversations(str(tmp_path / "saved"))
    assert [c["id"] for c in convs] == ["0", "2"]

    from draftsmith import assets

    fake = [{"id": "x_0", "conversations": [{"from": "human", "value": "q"},
                                            {"from": "gpt", "value": "r"}]}]
    monkeypatch.setattr(assets, "load_sharegpt", lambda: fake)
    assert sources.load_conversations("sharegpt")[0]["id"] == "x_0"


def test_unknown_source_fails_clearly(tmp_path):
    with pytest.raises(DraftsmithError, match="sharegpt"):
        sources.load_conversations(str(tmp_path / "missing.jsonl"))


def test_split_is_stable_and_disjoint():
    convs = [{"id": f"conv{i}_{i % 3}", "messages": []} for i in range(500)]
    train, heldout = splits.split_conversations(convs, 0.1)
    assert len(train) + len(heldout) == 500 and 20 < len(heldout) < 80
    assert {c["id"] for c in heldout} == {c["id"] for c in convs if is_heldout(c["id"], 0.1)}
    shuffled = convs[:]
    random.Random(0).shuffle(shuffled)
    train2, heldout2 = splits.split_conversations(shuffled, 0.1)
    assert {c["id"] for c in heldout2} == {c["id"] for c in heldout}
    assert not {c["id"] for c in train} & {c["id"] for c in heldout}
