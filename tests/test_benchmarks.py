"""Benchmark prompts: named benchmarks, every .jsonl shape, the turn filter, and bad input."""

import json

import pytest

from draftsmith import assets
from draftsmith.errors import DraftsmithError
from draftsmith.eval.benchmarks import BENCH_NAMES, BenchItem, load_bench
from draftsmith.splits import is_heldout


def _jsonl(tmp_path, rows, name="custom.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


# --------------------------------------------------------------------------- named benchmarks


def test_mt_bench_turn_filter():
    one = load_bench("mt_bench")
    two = load_bench("mt_bench", turns=2)
    assert len(one) == len(two) == 80
    assert all(len(item.turns) == 1 for item in one)
    assert all(len(item.turns) == 2 for item in two)
    assert [item.turns[0] for item in one] == [item.turns[0] for item in two]
    assert len({item.category for item in one}) == 8
    assert one[0] == BenchItem("81", one[0].turns, "writing", "mt_bench")
    assert one[0].turns[0].startswith("Compose an engaging travel blog post")


def test_mt_bench_num_prompts_keeps_the_first():
    assert [i.id for i in load_bench("mt_bench", num_prompts=3)] == ["81", "82", "83"]


def test_mt_bench_three_turns_is_an_empty_result():
    with pytest.raises(DraftsmithError, match="no prompts with 3 user turn.*at most 2 turn"):
        load_bench("mt_bench", turns=3)


def test_humaneval_is_single_turn():
    items = load_bench("humaneval", num_prompts=2)
    assert [i.id for i in items] == ["HumanEval/0", "HumanEval/1"]
    assert items[0].turns[0].startswith("from typing import List")
    assert items[0].bench == "humaneval" and items[0].category is None
    with pytest.raises(DraftsmithError, match="Lower `turns`"):
        load_bench("humaneval", turns=2)


def test_sharegpt_heldout_uses_the_split_and_first_human_message(monkeypatch):
    held = ["conv33_0", "conv142_0", "conv185_0"]  # held out at 2% (see test_assets)
    records = [
        {"id": "conv0_0", "conversations": [{"from": "human", "value": "trained on"}]},
        {"id": held[0], "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"id": held[1], "conversations": [{"from": "gpt", "value": "starts with the model"}]},
        {"id": held[2], "conversations": [{"from": "human", "value": "  "}]},
    ]
    assert all(is_heldout(k) for k in held) and not is_heldout("conv0_0")
    monkeypatch.setattr(assets, "load_sharegpt", lambda: records)
    assert load_bench("sharegpt-heldout") == [BenchItem(held[0], ["hi"], None, "sharegpt-heldout")]


# --------------------------------------------------------------------------- .jsonl shapes


def test_jsonl_every_shape(tmp_path):
    path = _jsonl(
        tmp_path,
        [
            {"prompt": "p1", "id": "a", "category": "math"},
            {"turns": ["t1", "t2"]},
            "",  # blank lines are allowed
            {"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"},
            ]},
            {"conversations": [{"from": "human", "value": "h1"}, {"from": "gpt", "value": "g1"}]},
        ],
    )
    items = load_bench(path, turns=1)
    assert items == [
        BenchItem("a", ["p1"], "math", "custom"),
        BenchItem("custom-2", ["t1"], None, "custom"),
        BenchItem("custom-4", ["u1"], None, "custom"),
        BenchItem("custom-5", ["h1"], None, "custom"),
    ]
    two = load_bench(path, turns=2)
    assert [(i.id, i.turns) for i in two] == [("custom-2", ["t1", "t2"]), ("custom-4", ["u1", "u2"])]
    assert [i.id for i in load_bench(path, num_prompts=2)] == ["a", "custom-2"]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", "line 2: not valid JSON"),
        ("[1, 2]", "line 2: expected a JSON object, found list"),
        ('{"text": "x"}', "line 2: expected exactly one of prompt/turns/messages/conversations"),
        ('{"prompt": "x", "turns": ["y"]}', r"found \['prompt', 'turns'\]"),
        ('{"prompt": ""}', "user turn 1 must be a non-empty string"),
        ('{"turns": "x"}', "'turns' must be a list of strings"),
        ('{"turns": ["ok", 3]}', "user turn 2 must be a non-empty string"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "'messages' holds no user message"),
        ('{"messages": [{"role": "user"}]}', "message 1 of 'messages' needs 'role' and 'content'"),
        ('{"conversations": "x"}', "'conversations' must be a list of objects"),
    ],
)
def test_jsonl_malformed_line_names_line_and_shape(tmp_path, line, expected):
    path = _jsonl(tmp_path, [{"prompt": "fine"}, line])
    with pytest.raises(DraftsmithError, match=expected) as err:
        load_bench(path)
    assert '{"prompt": str}' in str(err.value)  # says what was expected


# --------------------------------------------------------------------------- bad arguments


def test_unknown_bench_lists_names_and_mentions_jsonl():
    with pytest.raises(DraftsmithError) as err:
        load_bench("mtbench")
    message = str(err.value)
    assert "'mtbench'" in message and ".jsonl" in message
    assert all(name in message for name in BENCH_NAMES)


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(DraftsmithError, match="benchmark file not found.*nope.jsonl"):
        load_bench(str(tmp_path / "nope.jsonl"))


def test_bad_counts():
    with pytest.raises(DraftsmithError, match="num_prompts must be at least 1.*got: 0"):
        load_bench("mt_bench", num_prompts=0)
    with pytest.raises(DraftsmithError, match="turns must be at least 1.*got: 0"):
        load_bench("mt_bench", turns=0)


def test_empty_jsonl_is_an_error(tmp_path):
    with pytest.raises(DraftsmithError, match="no prompts.*0 items"):
        load_bench(_jsonl(tmp_path, [""]))


@pytest.mark.slow
def test_real_sharegpt_heldout():
    items = load_bench("sharegpt-heldout")
    print(f"sharegpt-heldout: {len(items)} prompts")
    assert 200 < len(items) < 500  # ~2% of ~17.6k conversations
    assert all(len(i.turns) == 1 and i.turns[0].strip() for i in items)
