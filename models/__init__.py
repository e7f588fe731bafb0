"""Targets and drafters. `load_drafter` maps a drafter spec to a Proposer for the decoder.

Specs: `prompt-lookup`; `truncated:N` (a copy of the target's first N layers, kind small_lm);
a folder written by `draftsmith export` or any transformers causal LM sharing the target's
tokenizer (kind small_lm). Adding a kind = one file in models/ + one line in DRAFTER_KINDS.
"""

from __future__ import annotations

import json
from pathlib import Path

from draftsmith.errors import DraftsmithError
from draftsmith.models.target import Target, load_target, resolve_dtype

DRAFTER_KINDS = ("small_lm", "eagle", "eagle3", "parallel", "prompt_lookup")


def load_drafter(spec: str, target: Target, dtype=None):
    """Return a Proposer for `spec`, on the target's device."""
    from draftsmith.models.prompt_lookup import PromptLookupProposer
    from draftsmith.models.small_lm import SmallLMProposer, check_vocab, truncated_copy

    if spec in ("prompt-lookup", "prompt_lookup"):
        return PromptLookupProposer()
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
    from draftsmith.models.formats import proposer_for, read_head_folder

    kind = json.loads((path / "config.json").read_text()).get("draftsmith_kind", "small_lm")
    if kind not in DRAFTER_KINDS:
        raise DraftsmithError("Unknown drafter kind in config.json", kind, f"Known kinds: {', '.join(DRAFTER_KINDS)}")
    if kind == "parallel":
        from draftsmith.models.parallel import load_parallel

        return load_parallel(path, target, dtype)
    head = read_head_folder(path, target.num_layers)   # EAGLE heads in any layout; None for LMs
    if head is not None:
        check_vocab(head.config.vocab_size, target.vocab_size, str(path))
        return proposer_for(head, target.model)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype or target.dtype, str(target.device)))
    check_vocab(model.get_output_embeddings().weight.shape[0], target.vocab_size, str(path))
    return SmallLMProposer(model.to(target.device))


__all__ = ["Target", "load_target", "load_drafter", "DRAFTER_KINDS"]
