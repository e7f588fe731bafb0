"""A checkpoint's training state, written and read without pickle.

`state/` of a checkpoint: `optimizer.safetensors` (every optimizer tensor), `trainer.json` (the
optimizer's structure and hyper-parameters, the LR scheduler, the gradient scaler, accelerate's
step counter) and `rng-<rank>.safetensors` (each process's torch, CUDA, numpy and Python random
states). A pickle can run code when it is loaded; these formats hold only numbers.

Checkpoints from before this format (`accelerate/` with `*.pkl` / `*.bin` files) are read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from draftsmith.errors import DraftsmithError

FORMAT = "draftsmith-checkpoint/2"


def write_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """The one writer of a checkpoint's tensor files (tests make it fail to simulate a full disk)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def write_json(obj, path: Path) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")


# ------------------------------------------------------------------ nested state <-> JSON + tensors

def split_tensors(tree, tensors: dict, path: str = "t"):
    """A JSON-able copy of `tree` whose tensors are moved into `tensors` (referenced by name). Dicts
    with non-string keys (an optimizer's parameter ids) keep their keys as [key, value] pairs."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree
        return {"__tensor__": path}
    if isinstance(tree, dict):
        if all(isinstance(k, str) for k in tree):
            return {k: split_tensors(v, tensors, f"{path}.{k}") for k, v in tree.items()}
        return {"__items__": [[k, split_tensors(v, tensors, f"{path}.{k}")] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store a {type(tree).__name__} in a checkpoint's state ({path})")


def join_tensors(tree, tensors: dict):
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__items__"}:
            return {k: join_tensors(v, tensors) for k, v in tree["__items__"]}
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    return tree


# ------------------------------------------------------------------------------- random states

def save_rng(path: Path) -> None:
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(py_state, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python": [version, gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    write_tensors(tensors, path, metadata={"scalars": json.dumps(scalars)})


def load_rng(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        scalars = json.loads(f.metadata()["scalars"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version, gauss = scalars["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    name, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------ save and load

def save_state(folder: Path, optimizer, scheduler, accelerator, with_optimizer: bool) -> None:
    """This process's part of a checkpoint's training state: its random states and, on the main process,
    the scheduler, scaler and step counter, plus the optimizer when `with_optimizer` (every process
    holds the whole optimizer state; sharded optimizers are saved by their engine)."""
    folder.mkdir(exist_ok=True)
    if accelerator.is_main_process:
        tensors: dict = {}
        small = {"scheduler": scheduler.state_dict(), "accelerator_step": accelerator.step,
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                 "optimizer": optimizer.state_dict() if with_optimizer else None}
        small = {"format": FORMAT, **split_tensors(small, tensors, "state")}
        write_tensors(tensors, folder / "optimizer.safetensors")
        write_json(small, folder / "trainer.json")
    save_rng(folder / f"rng-{accelerator.process_index}.safetensors")


def load_state(folder: Path, optimizer, scheduler, accelerator) -> None:
    """What save_state wrote, into this process's optimizer (when saved here), scheduler and RNGs."""
    small = join_tensors(json.loads((folder / "trainer.json").read_text()),
                         load_file(str(folder / "optimizer.safetensors")))
    if small["optimizer"] is not None:
        optimizer.load_state_dict(small["optimizer"])
    scheduler.load_state_dict(small["scheduler"])
    if accelerator.scaler is not None and small.get("scaler"):
        accelerator.scaler.load_state_dict(small["scaler"])
    accelerator.step = small["accelerator_step"]
    rng = folder / f"rng-{accelerator.process_index}.safetensors"
    if rng.is_file():
        load_rng(rng)
    else:   # saved by fewer processes: this one keeps its seeded state (raising here would hang the others)
        warnings.warn(f"{rng} is missing (the run was saved by fewer processes); process "
                      f"{accelerator.process_index} continues with freshly seeded random states")


# the plain-data classes DeepSpeed's ZeRO checkpoints hold besides tensors (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on a ZeRO-2 checkpoint of deepspeed 0.19)
_DEEPSPEED_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                      ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))


@contextmanager
def weights_only_loads():
    """Every torch.load inside (accelerate's, DeepSpeed's) refuses pickled objects other than tensors,
    plain containers and DeepSpeed's few plain-data classes, whatever weights_only its caller passes."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    engine = [getattr(sys.modules[m], n) for m, n in _DEEPSPEED_GLOBALS if hasattr(sys.modules.get(m), n)]
    try:
        with torch.serialization.safe_globals(engine):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


# what torch.distributed.checkpoint (FSDP under accelerate) writes into its plain-pickle `.metadata` file
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING", "ChunkStorageMetadata", "BytesStorageMetadata",
                                              "MetadataIndex", "StorageMeta"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = name in _DCP_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not among the types a checkpoint's metadata holds")
        return super().find_class(module, name)


def check_engine_pickles(folder: Path) -> None:
    """torch.distributed.checkpoint reads its `.metadata` files with plain pickle.load: refuse any that
    names a global outside what that metadata holds before the engine loads it (torch.load calls are
    covered by weights_only_loads)."""
    for path in sorted(Path(folder).rglob(".metadata")):
        try:
            with open(path, "rb") as f:
                _MetadataUnpickler(f).load()
        except Exception as err:
            raise DraftsmithError("A checkpoint's sharded-state metadata holds something other than metadata; "
                                  "draftsmith does not load it", f"{path}: {err}",
                                  "Resume from another checkpoint (delete this one), or start again") from None


def load_legacy_state(folder: Path, optimizer, scheduler, accelerator, with_optimizer: bool) -> None:
    """A checkpoint written before FORMAT (accelerate's save_state files), read with weights_only=True.
    Without `with_optimizer` (DeepSpeed, FSDP) accelerate.load_state has read all but the scheduler."""
    from accelerate.utils import load as accelerate_load     # weights_only=True, numpy arrays allowed

    with weights_only_loads():
        scheduler.load_state_dict(torch.load(folder / "custom_checkpoint_0.pkl", weights_only=True))
        if not with_optimizer:
            return
        optimizer.load_state_dict(torch.load(folder / "optimizer.bin", map_location="cpu", weights_only=True))
        states = accelerate_load(folder / f"random_states_{accelerator.process_index}.pkl")
    accelerator.step = states.get("step", 0)
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
