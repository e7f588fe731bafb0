"""LoRA drafters and LoRA-tuned targets through peft (Hu et al. 2106.09685).

`drafter.lora: {r, alpha, dropout, target_modules}` turns a small_lm or parallel drafter whose layers
come from the target (or from `init_from`) into frozen base weights plus low-rank adapters: only the
adapters (and, for kind parallel, the mask token's embedding row, through peft's trainable tokens)
reach the optimizer, so gradients and AdamW moments shrink to the adapters' size.

The adapters are injected into the transformers model in place, so the training module, the
checkpoint's `drafter/` folder (base and adapter tensors under peft's names, the settings in
config.json as `draftsmith_lora`) and an exact `--resume` all work on that one model.
`export --format hf` merges the adapters (`merge_and_unload`) into a plain transformers folder.

`target.adapter: FOLDER` loads a target as a base model plus a peft adapter, merged at load, so a
drafter is trained for exactly the model that is served.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.models.target import Target

LORA_KEYS = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": None}
"""drafter.lora's keys and their defaults; target_modules null = every linear layer but the LM head."""


def lora_settings(raw: dict | None) -> dict | None:
    """drafter.lora checked and completed with the defaults (None = off)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DraftsmithError("drafter.lora must be a mapping or null", raw,
                              "Write e.g. drafter.lora={r: 16, alpha: 32, dropout: 0.05, target_modules: null}")
    unknown = sorted(set(raw) - set(LORA_KEYS))
    if unknown:
        raise DraftsmithError("unknown key in drafter.lora", unknown, f"Valid keys: {', '.join(LORA_KEYS)}")
    s = {**LORA_KEYS, **raw}
    ok_r = isinstance(s["r"], int) and not isinstance(s["r"], bool) and s["r"] >= 1
    ok_alpha = isinstance(s["alpha"], (int, float)) and not isinstance(s["alpha"], bool) and s["alpha"] > 0
    ok_dropout = isinstance(s["dropout"], (int, float)) and not isinstance(s["dropout"], bool) and 0 <= s["dropout"] < 1
    modules = s["target_modules"]
    ok_modules = modules is None or (isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules))
    for ok, key, fix in ((ok_r, "r", "an integer >= 1"), (ok_alpha, "alpha", "a number > 0"),
                         (ok_dropout, "dropout", "a number in [0, 1)"),
                         (ok_modules, "target_modules", "a list of module names (e.g. [q_proj, v_proj]) or null")):
        if not ok:
            raise DraftsmithError(f"invalid drafter.lora.{key}", s[key], f"Use {fix}")
    return {"r": s["r"], "alpha": float(s["alpha"]), "dropout": float(s["dropout"]), "target_modules": modules}


def peft_config(settings: dict, mask_token: int | None = None):
    from peft import LoraConfig

    extra = {"trainable_token_indices": {"embed_tokens": [mask_token]}} if mask_token is not None else {}
    return LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                      target_modules=settings["target_modules"] or "all-linear", **extra)


def apply_lora(model: torch.nn.Module, settings: dict) -> torch.nn.Module:
    """Inject LoRA adapters into `model` in place (its base weights frozen) and record the settings in
    its config. A parallel drafter's mask row stays trainable (peft's trainable tokens)."""
    from peft import get_peft_model

    mask_token = getattr(model.config, "draftsmith_mask_token_id", None)
    names = [name for name, _ in model.named_modules()]
    # peft matches a name or a dotted suffix, and refuses only when nothing matches: check each name
    unknown = [m for m in settings["target_modules"] or () if not any(n == m or n.endswith(f".{m}") for n in names)]
    if unknown:
        raise DraftsmithError("drafter.lora.target_modules names modules the drafter does not have", unknown,
                              f"Use some of its linear layers: {', '.join(linear_names(model))}; or null for all of them")
    get_peft_model(model, peft_config(settings, mask_token))     # modifies `model`; the wrapper is not kept
    model.config.draftsmith_lora = dict(settings)
    _declare_tied_token_adapter(model)
    return model


def linear_names(model: torch.nn.Module) -> list[str]:
    """The names (last part) of a model's linear layers but the LM head: what target_modules may name."""
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def _declare_tied_token_adapter(model: torch.nn.Module) -> None:
    """With tied embeddings peft wraps the LM head's weight too (the same tensors as the embedding's
    wrapper); save_pretrained refuses shared tensors it was not told about, so name the head's copies
    as tied (saved once, as transformers saves a tied LM head)."""
    head = model.get_output_embeddings()
    if not hasattr(head, "token_adapter"):
        return
    name = next(n for n, m in model.named_modules() if m is head)
    declared = type(model)._tied_weights_keys or {}
    tied = dict(declared) if isinstance(declared, dict) else dict.fromkeys(declared)
    tied[re.escape(f"{name}.token_adapter.")] = "the embedding's token adapter"
    model._tied_weights_keys = tied


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, tied ones counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def merged_from_folder(folder: Path) -> torch.nn.Module:
    """A checkpoint's LoRA drafter (base + adapters under peft's names) merged into a plain model."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    settings = getattr(config, "draftsmith_lora", None)
    if settings is None:
        raise DraftsmithError("This drafter folder holds no LoRA settings (draftsmith_lora in config.json)",
                              str(folder), "Export it without merging: it is a plain model already")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    wrapper = get_peft_model(model, peft_config(settings, getattr(config, "draftsmith_mask_token_id", None)))
    _load_state(model, folder)
    merged = wrapper.merge_and_unload()
    merged.__dict__.pop("_tied_weights_keys", None)      # the class's own ties again
    del merged.config.draftsmith_lora
    merged.config.draftsmith_lora_merged = settings      # provenance: trained as LoRA adapters, merged
    return merged


def _load_state(model: torch.nn.Module, folder: Path) -> None:
    """The folder's safetensors into `model`; every tensor must be there (tied ones saved once)."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(path)))
    mine = model.state_dict()
    loaded = {mine[k].data_ptr() for k in state if k in mine}
    missing = [k for k in mine if k not in state and mine[k].data_ptr() not in loaded]
    unexpected = [k for k in state if k not in mine]
    if missing or unexpected:
        raise DraftsmithError("The LoRA drafter's weights do not match its config",
                              f"{folder}: missing {missing[:3]}, unexpected {unexpected[:3]}",
                              "Export a checkpoint written by draftsmith train with this drafter.lora")
    model.load_state_dict(state, strict=False)


def load_with_adapter(model: torch.nn.Module, adapter: str | Path) -> torch.nn.Module:
    """`model` with the peft adapter in `adapter` merged into its weights (target.adapter). The folder is
    checked first (a JSON adapter_config.json, weights in safetensors: no pickle is loaded), and the
    adapter must load whole: every tensor its config implies, at the target's shapes."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import SafetensorError, safe_open

    folder = Path(adapter).expanduser()
    fix = "Point at a folder written by peft's save_pretrained (for this target), or set target.adapter=null"
    if not (folder / "adapter_config.json").is_file():
        raise DraftsmithError("target.adapter is not a peft adapter folder (no adapter_config.json)", str(folder), fix)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        bin_only = (folder / "adapter_model.bin").is_file()
        raise DraftsmithError("target.adapter holds no adapter_model.safetensors" + (
            " (an adapter_model.bin is a pickle, which draftsmith does not load)" if bin_only else ""), str(folder),
            "Save the adapter with peft's save_pretrained(safe_serialization=True), or set target.adapter=null")
    try:
        raw = json.loads((folder / "adapter_config.json").read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DraftsmithError("target.adapter's adapter_config.json is not valid JSON", f"{folder}: {err}", fix) from None
    if not isinstance(raw, dict):
        raise DraftsmithError("target.adapter's adapter_config.json must hold a JSON object", str(folder), fix)
    print(f"[draftsmith] merging the adapter {folder} into the target", flush=True)
    try:
        tuned = PeftModel.from_pretrained(model, str(folder))
        with safe_open(str(weights), framework="pt") as f:
            stored = set(f.keys())
    except (ValueError, TypeError, KeyError, RuntimeError, OSError, SafetensorError) as err:
        first = str(err).strip().splitlines()
        raise DraftsmithError("target.adapter cannot be applied to this target",
                              f"{folder}: {type(err).__name__}: {' '.join(first[:2])[:300]}",
                              "Use a peft adapter trained for this target (target.name), as peft saved it, "
                              "or set target.adapter=null") from None
    missing = sorted(k.removesuffix(".weight") for k in get_peft_model_state_dict(tuned) if k not in stored)
    if missing:   # peft loads what is there and leaves the rest at its initialisation, silently
        raise DraftsmithError("target.adapter's weights lack tensors its adapter_config.json implies",
                              f"{folder}: {missing[:3]}{' ...' if len(missing) > 3 else ''}", fix)
    return tuned.merge_and_unload()


def adapted_target(target, adapter: str | Path):
    """A Target whose model is `target`'s with the peft adapter merged in (target.adapter)."""
    return Target(load_with_adapter(target.model, adapter), target.tokenizer, name=f"{target.name}+{Path(adapter).name}")
