"""Targets and drafters. `load_drafter` maps a drafter spec to a Proposer for the decoder.

Specs: `prompt-lookup`; `A+B` (several drafters whose drafts are branches of one tree);
`truncated:N` (a copy of the target's first N layers, kind small_lm);
a folder written by `draftsmith export` or any transformers causal LM sharing the target's
tokenizer (kind small_lm). Adding a kind = one file in models/ + one line in DRAFTER_KINDS.
"""

from __future__ import annotations

from pathlib import Path

from draftsmith.errors import DraftsmithError
from draftsmith.models.checks import (TargetShape, check_lm_fits_target, check_shapes, meta_shapes, read_config_json,
                                     weight_shapes)
from draftsmith.models.composite import CompositeProposer
from draftsmith.models.formats import proposer_for, read_head_folder
from draftsmith.models.parallel import ParallelProposer
from draftsmith.models.prompt_lookup import PromptLookupProposer
from draftsmith.models.small_lm import SmallLMProposer, check_vocab, truncated_copy
from draftsmith.models.target import Target, load_target, resolve_dtype

DRAFTER_KINDS = ("small_lm", "eagle", "eagle3", "parallel", "dflash", "dspark", "prompt_lookup")


def load_drafter(spec: str, target: Target, dtype=None):
    """Return a Proposer for `spec`, on the target's device."""
    if spec in ("prompt-lookup", "prompt_lookup"):
        return PromptLookupProposer()
    if "+" in spec and not Path(spec).expanduser().exists():   # several drafters as one tree
        return CompositeProposer([load_drafter(part, target, dtype) for part in spec.split("+")])
    if spec.startswith("truncated:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise DraftsmithError("truncated:N needs an integer number of layers", spec) from None
        return SmallLMProposer(truncated_copy(target.model, n))
    path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise DraftsmithError(
            "Unknown drafter", spec,
            "Use prompt-lookup, truncated:N, or a folder holding an exported drafter (config.json)")
    kind = read_config_json(path).get("draftsmith_kind", "small_lm")
    if kind not in DRAFTER_KINDS:
        raise DraftsmithError("Unknown drafter kind in config.json", kind, f"Known kinds: {', '.join(DRAFTER_KINDS)}")
    shape = TargetShape(target.model.config.hidden_size, target.vocab_size, target.num_layers)
    dtype = resolve_dtype(dtype or target.dtype, str(target.device))
    if kind == "parallel":   # a transformers LM with a mask token: checked as small_lm's are, and its mask
        return ParallelProposer(load_small_lm(path, shape, dtype).to(target.device))
    head = read_head_folder(path, shape)   # EAGLE heads in any layout, checked against the target; None for LMs
    if head is not None:
        return proposer_for(head, target.model)
    model = load_small_lm(path, shape, dtype)
    check_vocab(model.get_output_embeddings().weight.shape[0], target.vocab_size, str(path))
    return SmallLMProposer(model.to(target.device))


def load_small_lm(path: Path, target, dtype):
    """A transformers causal LM drafter (kinds small_lm and parallel), its config checked against the target
    (models.checks.TargetShape) and its weights' shapes against its config before the model is built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise DraftsmithError("The drafter's config.json is not a transformers model config", f"{path}: {err}",
                              "Point at a folder written by draftsmith export or save_pretrained") from None
    check_lm_fits_target(config, target, str(path))
    try:
        expected = meta_shapes(lambda: AutoModelForCausalLM.from_config(config))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise DraftsmithError("transformers cannot build a model from the drafter's config.json",
                              f"{path}: {err}", "Point at a folder written by draftsmith export") from None
    tied = ("lm_head.weight",) if getattr(config, "tie_word_embeddings", False) else ()
    check_shapes(expected, weight_shapes(path), str(path), optional=tied)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


__all__ = ["Target", "load_target", "load_drafter", "DRAFTER_KINDS"]
