"""A checkpoint's drafter weights back into the training drafter, shapes checked first.

The weights are the checkpoint's `drafter/` folder (what save_pretrained wrote: model.safetensors,
or shards with an index); pickled weight files there are never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from draftsmith.errors import DraftsmithError


def weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if any(Path(name).name != name for name in names):
            raise DraftsmithError("The drafter's weight index names files outside its folder", str(index))
        return [folder / name for name in names]
    raise DraftsmithError("The checkpoint's drafter folder holds no model.safetensors", str(folder),
                          "Resume from another checkpoint (delete this one), or start again with --overwrite")


def saved_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def check_shapes(model: torch.nn.Module, saved: dict[str, tuple[int, ...]], where: Path) -> None:
    """Refuse a checkpoint whose tensors do not fit the recipe's drafter (e.g. drafter.num_layers changed)."""
    mine = model.state_dict()
    loaded_ptrs = {mine[k].data_ptr() for k in saved if k in mine}
    differ = [f"{k}: checkpoint {list(saved[k])}, recipe {list(mine[k].shape)}"
              for k in saved if k in mine and tuple(mine[k].shape) != saved[k]]
    extra = [f"{k} (only in the checkpoint)" for k in saved if k not in mine]
    # tied weights (an LM head sharing the embedding) are saved once
    missing = [f"{k} (only in the recipe's drafter)" for k in mine
               if k not in saved and mine[k].data_ptr() not in loaded_ptrs]
    problems = differ + extra + missing
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise DraftsmithError("The recipe's drafter has another shape than the checkpoint's (a drafter setting "
                              "changed since the run started)", f"{where}: {'; '.join(problems[:3])}{more}",
                              "Resume with the drafter settings of the run's config.yaml, or train a new run "
                              "(another run.name, or --overwrite)")


def load_drafter_weights(model: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    files = weight_files(folder)
    check_shapes(model, saved_shapes(files), folder)
    state = {}
    for path in files:
        state.update(load_file(str(path)))
    model.load_state_dict(state, strict=False)   # strict=False: tied weights are saved once (checked above)
