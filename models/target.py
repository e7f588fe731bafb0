"""The target: a frozen transformers causal LM with a rollback-able KV cache and hidden-state taps.

A target loads from an asset name (`smollm2-135m-instruct`), a local transformers folder, a GGUF
file, or a hub id when a hub is reachable. GGUF files are dequantised once and cached as plain
safetensors, so the second load is fast.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from draftsmith import assets
from draftsmith.errors import DraftsmithError
from draftsmith.folders import sha256_of
from draftsmith.models.batch_cache import RaggedCache
from draftsmith.models import cpu_linear
from draftsmith.models.compiled_target import CompiledForward, StaticKV
from draftsmith.models.static_rows import StaticRows
from draftsmith.protocol.tree import ancestor_mask, depths


def cache_root() -> Path:
    """Where draftsmith keeps converted targets: $DRAFTSMITH_CACHE, else ~/.cache/draftsmith."""
    return Path(os.environ.get("DRAFTSMITH_CACHE", Path.home() / ".cache" / "draftsmith"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """The device to run on: None picks cuda when available, else cpu; a named one must exist here
    (torch's own errors for `tpu` or a CPU-only build are tracebacks)."""
    if device is None:
        return default_device()
    have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
        ["mps"] if torch.backends.mps.is_available() else [])
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise DraftsmithError("Unknown device", device, f"Use one of: {', '.join(have)}") from None
    count = torch.cuda.device_count() if kind.type == "cuda" and torch.cuda.is_available() else 0
    if kind.type not in have or (kind.type == "cuda" and kind.index is not None and kind.index >= count):
        raise DraftsmithError("This device is not available on this machine", device,
                              f"Use one of: {', '.join(have)}" + (f" (cuda:0..cuda:{count - 1})" if count else ""))
    return device


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
"""The precisions a target loads in, by name (`auto` aside)."""


def native_bf16(device: str) -> bool:
    """Does `device` compute bf16 natively: a CUDA GPU with bf16, or a CPU whose oneDNN has bf16 kernels (AVX512-BF16,
    AMX; torch's own test, the trainer's too)? Elsewhere (an AVX2 CPU) bf16 is emulated: eagerly, or compiled on MKL's
    `mm`, a bf16 forward over 8 tokens cost 1.6x fp32's on an AVX2 AMD EPYC; compiled on draftsmith's row kernel
    (models/row_kernel.py: bf16 weights, fp32 arithmetic) it is the fastest decoding measured there
    (bench/results/cpu-avx2)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """`auto` means bf16 on CUDA and fp32 on CPU (fp32 keeps CPU greedy equality exact); `native` bf16 where the
    device computes it natively (`native_bf16`), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype == "native":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise DraftsmithError("Unknown dtype", dtype, f"Use one of: auto, native, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x renamed `past_key_values=` to `cache=`; the name this model class takes."""
    return _cache_kwarg_of(type(model))


def new_cache(model: torch.nn.Module) -> DynamicCache:
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signatures take no config
        return DynamicCache()


def rollback(cache: DynamicCache, length: int) -> None:
    """Drop cached positions so that exactly `length` remain (a negative crop works on every 4.x/5.x)."""
    drop = cache.get_seq_length() - length
    if drop < 0:
        raise ValueError(f"cannot roll a cache of {cache.get_seq_length()} forward to {length}")
    if drop:
        cache.crop(-drop)


@dataclass
class TargetOutput:
    logits: torch.Tensor          # [T, V] float32
    hidden: list[torch.Tensor]    # one [T, H] per requested layer, before the final norm


def use_masked_gqa() -> None:
    """transformers' sdpa path copies the KV cache into every query head (`repeat_kv`) for each
    masked forward of a grouped-query model, i.e. every verify step over 2+ tokens; torch's CPU sdpa
    takes the grouped heads and a mask directly (`enable_gqa`), with bit-identical logits (measured on
    SmolLM2: chains of 2-8 tokens and a tree). transformers' switch for it is an environment variable,
    read at each call; a value the user set is kept. On CUDA a mask with `enable_gqa` can fall back to
    the math kernel, so this is for CPU targets only."""
    os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")


class Target:
    """A frozen causal LM. Batch size 1: every tensor it returns drops the batch axis."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "target"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_length = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.num_layers = model.config.num_hidden_layers
        self._layers = _decoder_layers(model)
        self.compiled: CompiledForward | None = None   # --compile: `compile()` (models/compiled_target.py)
        self.static_length = 0
        if self.device.type == "cpu":
            use_masked_gqa()

    def compile(self, max_length: int, linear_kernel: str = "auto", row_invariant: bool = True) -> None:
        """Decode through a static cache of `max_length` slots and a compiled forward from now on (new caches
        only): `draftsmith eval --compile`. The graphs are built on first use; the linear layers run
        `linear_kernel` ("auto": the faster on this CPU, models/cpu_linear.py); on a CPU the attention is
        models/row_attention.py's unless `row_invariant` is off (a benchmark's comparison)."""
        if max_length > self.max_length:
            max_length = self.max_length
        self.compiled = CompiledForward(self.model, linear_kernel, row_invariant)
        self.static_length = max_length

    def pack_drafter(self, proposer) -> int:
        """With --compile's oneDNN or row kernel (models/cpu_linear.py) a drafter's own linear layers run it too
        (eagerly; the target's own layers are left to its graph). Returns how many were swapped: 0 with `mm`, or
        eager."""
        if self.compiled is None or self.compiled.kernel.name not in cpu_linear.LAYERS:
            return 0
        return cpu_linear.pack_drafter(proposer, {id(p) for p in self.model.parameters()}, self.compiled.kernel.name)

    def new_cache(self) -> DynamicCache | StaticKV:
        if self.compiled is not None:
            return StaticKV(self.model, self.static_length)
        return new_cache(self.model)

    def new_batch_cache(self) -> RaggedCache | StaticRows:
        """The shared cache of batched decoding (eval/batched.py): ragged rows of dynamic caches, or with --compile
        rows of the static cache, each computed as the batch-1 compiled forward computes it (models/static_rows.py).
        Its rows come from `new_cache()`'s, prefilled alone."""
        if self.compiled is not None:
            reduced = self.dtype in (torch.bfloat16, torch.float16)   # its one-token rows: models/static_rows.py
            return StaticRows(self.model, self.static_length, self.compiled.min_width,
                              row_width=self.compiled.min_width if reduced else 1)
        return RaggedCache()

    @torch.inference_mode()
    def forward(self, input_ids: list[int] | torch.Tensor, cache: DynamicCache,
                hidden_layers: tuple[int, ...] = (), last_only: bool = False,
                parents: list[int] | None = None) -> TargetOutput:
        """Extend `cache` by `input_ids`; return their logits (all, or the last only) and taps.

        `hidden_layers` are 0-based decoder-layer output indices; -1 is the last layer's output
        before the final norm (what EAGLE heads read). `parents` makes the input a draft tree:
        input_ids = [root, node 0, ...], node i follows node parents[i] (-1: the root); each row
        then sees the cache, its ancestors and itself, at position past + depth (protocol/tree.py).
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).view(1, -1)
        if isinstance(cache, StaticKV):
            return self._static_forward(ids, cache, hidden_layers, last_only, parents)
        tree = {} if parents is None else self._tree_inputs(parents, cache.get_seq_length())
        out, captured = self._run(ids, cache, hidden_layers, logits_to_keep=1 if last_only else 0, **tree)
        hidden = [captured[i % self.num_layers][0] for i in hidden_layers]
        return TargetOutput(logits=out.logits[0].float(), hidden=hidden)

    def describe_forward(self) -> str:
        """The forward plain and speculative decoding run, as a report names it."""
        return self.compiled.describe() if self.compiled is not None else "eager (dynamic KV cache)"

    def placeable(self, parents: list[int], cache: DynamicCache | StaticKV) -> list[int]:
        """The nodes of a tree a verify after `cache` places where their rows round as plain decoding's (all in fp32,
        all but a few in bf16: bench/results/cpu-exact-fp32-trees): every node, but on the compiled CPU target (whose
        chain rows equal plain decoding's bit for bit, models/row_attention.py) not those that would cross a block of
        the attention's keys (models/slot_sums.py) or pass the spare slots, nor their descendants (StaticKV.place);
        the decoder verifies the rest. A cache whose layers place nothing (a sliding-window model's, written by
        transformers) verifies its trees packed, as before."""
        if not isinstance(cache, StaticKV) or not self.compiled.row_attention:
            return list(range(len(parents)))
        return cache.placeable(parents)

    @torch.inference_mode()
    def forward_rows(self, inputs: list[list[int]], cache: RaggedCache | StaticRows,
                     hidden_layers: tuple[int, ...] = (),
                     parents: list[list[int] | None] | None = None) -> list[TargetOutput]:
        """One forward over several sequences at once (batched decoding): row r of `cache` is extended by
        inputs[r] = [root, draft nodes...] (a tree where parents[r] is given) and gets its own logits and
        taps, exactly those of `forward` on that row alone up to rounding (models/batch_cache.py; with --compile
        models/static_rows.py, through the compiled graph)."""
        ids, see, positions = cache.verify_inputs(inputs, parents or [None] * len(inputs))
        attend = attention_inputs(self.model, see, positions)
        if isinstance(cache, StaticRows):
            start = max(cache.lengths)
            extra = _cache_position(self.model, start, ids.shape[1])
            logits, hidden = self.compiled(ids.to(self.device), attend["position_ids"], attend["attention_mask"],
                                           cache.cache, False, extra)
            captured = {i: hidden[i] for i in range(self.num_layers)}
        else:
            out, captured = self._run(ids.to(self.device), cache.cache, hidden_layers, **attend)
            logits = out.logits
        logits = logits.float()
        return [TargetOutput(logits=logits[r, :len(x)], hidden=[captured[i % self.num_layers][r, :len(x)]
                                                                for i in hidden_layers])
                for r, x in enumerate(inputs)]

    def _static_forward(self, ids: torch.Tensor, cache: StaticKV, hidden_layers: tuple[int, ...], last_only: bool,
                        parents: list[int] | None) -> TargetOutput:
        """`forward` through the compiled graph: every slot of the static cache masked explicitly (the committed
        ones and each row's ancestors among the new ones visible), positions explicit, each row written at the slot
        the cache places it (`StaticKV.place`: a tree's off-chain nodes where the attention sums them as plain
        decoding does). A forward narrower than the graph's `min_width` gets a copy of its last row (written to a
        spare slot, never committed, its output dropped): its rows are then computed by the same kernel as a wider
        forward's (models/cpu_linear.py)."""
        n, past = ids.shape[1], cache.length
        parents = list(range(-1, n - 2)) if parents is None else parents
        pad = 0 if last_only else max(0, self.compiled.min_width - n)
        slots = torch.tensor(cache.place(parents, pad))
        see = torch.zeros(n, cache.slots, dtype=torch.bool)
        see[:, :past] = True
        see[:, slots] = ancestor_mask(parents)
        positions = [past] + [past + d for d in depths(parents)]
        if pad:
            ids = torch.cat([ids] + [ids[:, -1:]] * pad, dim=1)
            see = torch.cat([see] + [see[-1:]] * pad)
            positions += positions[-1:] * pad
        attend = attention_inputs(self.model, see, positions)
        extra = _cache_position(self.model, past, n + pad)
        logits, hidden = self.compiled(ids, attend["position_ids"], attend["attention_mask"], cache.cache, last_only,
                                       extra)
        if pad:
            cache.sync()          # transformers counted the pad row's slot: the committed length is past + n
        return TargetOutput(logits=logits[0, :n].float(),
                            hidden=[hidden[i % self.num_layers][0, :n] for i in hidden_layers])

    def _run(self, ids: torch.Tensor, cache: DynamicCache, hidden_layers: tuple[int, ...], **kwargs):
        """The model's forward with `cache`, and the outputs of the tapped decoder layers."""
        captured: dict[int, torch.Tensor] = {}
        handles = [self._layers[i].register_forward_hook(_capture(captured, i))
                   for i in sorted({i % self.num_layers for i in hidden_layers})]
        try:
            out = self.model(input_ids=ids, use_cache=True, **{cache_kwarg(self.model): cache}, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return out, captured

    @staticmethod
    def rollback(cache: DynamicCache | StaticKV, length: int) -> None:
        if isinstance(cache, StaticKV):
            cache.rollback(length)
        else:
            rollback(cache, length)

    @staticmethod
    def keep(cache: DynamicCache | StaticKV, start: int, rows: list[int]) -> None:
        """Keep cached positions [:start] and, of those after, only `rows` (offsets from start) in
        order: the verified root and accepted path of a tree. A chain's path is a prefix: a crop."""
        if isinstance(cache, StaticKV):
            cache.keep(start, rows)
            return
        if rows == list(range(len(rows))):
            rollback(cache, start + len(rows))
            return
        index = torch.tensor(rows, dtype=torch.long)
        for layer in _cache_layers(cache):
            length = layer.keys.shape[-2]
            if layer.get_seq_length() != length:   # a sliding layer past its window (refused before)
                raise DraftsmithError("Cannot keep tree rows in a truncated sliding-window cache", length)
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, torch.cat([t[..., :start, :], t[..., start + index.to(t.device), :]], dim=-2))
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = start + len(rows)

    def _tree_inputs(self, parents: list[int], past: int) -> dict:
        """The 4-D additive attention mask and position ids of a draft tree after `past` cached tokens."""
        n = len(parents) + 1
        window = getattr(self.model.config, "sliding_window", None)
        if window and "sliding_attention" in (getattr(self.model.config, "layer_types", None) or ()) \
                and past + n > window - 1:
            raise DraftsmithError("Tree verification past the target's sliding window is not supported",
                                  past + n, f"Use --tree none for contexts over {window - 1} tokens")
        see = torch.ones(n, past + n, dtype=torch.bool)
        see[:, past:] = ancestor_mask(parents)
        return attention_inputs(self.model, see, [past] + [past + d for d in depths(parents)])


def attention_inputs(model: torch.nn.Module, see: torch.Tensor, positions) -> dict:
    """Keyword arguments that make a transformers causal LM attend as `see` says: see [new, cached + new] bool
    (True: may attend), or [rows, new, cached + new] with one mask per row (batched decoding) -> a 4-D additive
    mask (per attention type where the model has several, e.g. Gemma 3's sliding and full layers) and explicit
    position ids (positions: [new], or [rows, new])."""
    param = next(model.parameters())
    mask = torch.zeros(see.shape, dtype=param.dtype).masked_fill(~see, torch.finfo(param.dtype).min)
    mask = (mask[None, None] if see.dim() == 2 else mask[:, None]).to(param.device)   # [rows, 1, new, all]
    if getattr(model.config, "layer_types", None):
        mask = {kind: mask for kind in set(model.config.layer_types)}
    positions = torch.as_tensor(positions, dtype=torch.long, device=param.device)
    return {"attention_mask": mask, "position_ids": positions if positions.dim() == 2 else positions[None]}


def _cache_position(model: torch.nn.Module, start: int, n: int) -> dict:
    """The static-cache forward's `cache_position=` (slots start..start+n) where the model takes one, else nothing."""
    if not _takes_cache_position(model):
        return {}
    return {"cache_position": torch.arange(start, start + n, device=next(model.parameters()).device)}


def _takes_cache_position(model: torch.nn.Module) -> bool:
    """transformers before 5.2x take `cache_position=` (a static cache writes there); later ones count themselves."""
    base = getattr(model, model.base_model_prefix, model)
    return "cache_position" in inspect.signature(type(base).forward).parameters


def _cache_layers(cache: DynamicCache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise DraftsmithError("Tree verification needs a transformers version whose DynamicCache has `layers`",
                              type(cache).__name__, "Upgrade transformers to 5.x, or use --tree none")
    return layers


def _capture(store: dict, index: int):
    def hook(module, args, output):
        store[index] = output[0] if isinstance(output, tuple) else output
    return hook


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise DraftsmithError("Cannot find the decoder layers of this model", type(model).__name__,
                              "draftsmith supports transformers causal LMs with `model.layers`")
    return layers


def data_token_probs(t_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target's probability of the data's token at each trained position: [B, T-1] float32, 0 outside
    `mask`. t_logits [N, V] are target_signals' rows of `mask`, tokens [N] the data's next token there
    (PARD-2's CAT, the `reach` position weights)."""
    probs = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    probs[mask] = torch.softmax(t_logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
    return probs


def target_signals(target_model: torch.nn.Module, input_ids, attention_mask, mask, layers: tuple[int, ...] = ()):
    """The online target signals for training (train/steps.py, the teacher cache): [N, V] target
    logits at the N positions of `mask` ([B, T-1], position j predicts token j+1; the LM head runs
    on those rows only) and, for feature-level drafters, the outputs [B, T, H] (before the final
    norm) of the decoder `layers` (-1: last)."""
    base = getattr(target_model, target_model.base_model_prefix)
    n = len(base.layers)
    captured: dict[int, torch.Tensor] = {}
    hooks = [base.layers[i].register_forward_hook(
        lambda m, a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in sorted({j % n for j in layers})]
    try:
        with torch.no_grad():
            final = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
            logits = target_model.get_output_embeddings()(final[:, :-1][mask])
    finally:
        for hook in hooks:
            hook.remove()
    return logits, [captured[j % n] for j in layers]


# ---------------------------------------------------------------------------------------- loading

def load_target(spec: str, dtype: str | torch.dtype | None = "auto", device: str | None = None) -> Target:
    """Load a frozen target from an asset name, a transformers folder, a GGUF file or a hub id."""
    device = check_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if torch_dtype == torch.bfloat16 and not str(device).startswith("cuda") and not native_bf16(device):
        print("[draftsmith] bf16 is emulated on this CPU (oneDNN has no bf16 kernels here: no AVX512-BF16 or AMX): an "
              "eager bf16 forward costs more than fp32's here; with --compile the linear layers run on draftsmith's "
              "row kernel (bf16 weights, fp32 arithmetic), the fastest decoding measured on such a CPU "
              "(bench/results/cpu-avx2). --dtype native (or fp32) loads fp32 here.", file=sys.stderr, flush=True)
    folder, name = resolve_model_folder(spec)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _apply_asset_chat_format(spec, model, tokenizer)
    return Target(model, tokenizer, name=name)


def _apply_asset_chat_format(spec: str, model, tokenizer) -> None:
    """An asset whose GGUF has no chat template gets its family's, and its end-of-turn token as EOS."""
    asset = assets.TARGETS.get(spec)
    if asset is None:
        return
    if asset.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = asset.chat_template
    if asset.stop_tokens:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        extra = [tokenizer.convert_tokens_to_ids(t) for t in asset.stop_tokens]
        model.generation_config.eos_token_id = sorted(set(eos + [i for i in extra if i is not None]))


def resolve_model_folder(spec: str) -> tuple[str, str]:
    """Map a target spec to something `from_pretrained` loads: (folder or hub id, display name)."""
    path = Path(spec).expanduser()
    if assets.is_target_asset(spec):
        return str(gguf_to_folder(assets.target_gguf_path(spec))), spec
    if path.is_dir():
        if not (path / "config.json").exists():
            raise DraftsmithError("This folder holds no transformers model (no config.json)", str(path),
                                  "Point at a folder written by save_pretrained, a .gguf file, or an asset name")
        return str(path), path.name
    if path.suffix == ".gguf":
        if not path.exists():
            raise DraftsmithError("GGUF file not found", str(path))
        return str(gguf_to_folder(path)), path.stem
    if path.exists() or spec.startswith((".", "/", "~")):
        raise DraftsmithError("Cannot load a target from this path", spec,
                              "Give a transformers folder, a .gguf file, or an asset name such as smollm2-135m-instruct")
    return _reachable_hub_id(spec), spec


def _reachable_hub_id(spec: str) -> str:
    """`spec` if it names a model on a reachable hub (or in the hub cache); else a clear error. A
    mistyped asset name lands here, and transformers' offline error would not say so."""
    import difflib

    from transformers import AutoConfig

    try:   # the hub cache first; then one short question to the hub (transformers would retry for ~30 s)
        AutoConfig.from_pretrained(spec, local_files_only=True)
        return spec
    except (OSError, ValueError):
        pass
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(spec, timeout=10)
        return spec
    except Exception as err:  # noqa: BLE001 - offline, unknown, gated or malformed: the same answer
        near = difflib.get_close_matches(spec, list(assets.TARGETS), n=1)
        raise DraftsmithError("The target is neither an asset name, a folder, a .gguf file nor a reachable hub id",
                              spec, (f"Did you mean {near[0]}? " if near else "") +
                              f"Asset names: {', '.join(sorted(assets.TARGETS))} (hub: {type(err).__name__})") from None


CONVERSION = 2
"""The version of what `gguf_to_folder` writes, part of the cache key: 2 unpacks the weights and drops the GGUF's
quantization_config (1, before, kept it and was keyed by the file's path and mtime, so each install converted again)."""


@functools.lru_cache(maxsize=None)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(f"{sha256_of(Path(path))}:{CONVERSION}".encode()).hexdigest()[:16]


def cache_folder(gguf: Path) -> Path:
    """Where `gguf_to_folder` keeps a GGUF's conversion: named by the file's content (sha256, hashed once per
    process and file version: 0.1-0.3 s for SmolLM2's 98 MB) and CONVERSION, so a reinstall of the same asset (at
    another path, with a new mtime) finds the folder converted before."""
    gguf = Path(gguf).resolve()
    stat = gguf.stat()
    return cache_root() / "targets" / f"{gguf.stem}-{_content_key(str(gguf), stat.st_size, stat.st_mtime_ns)}"


def _name_other_conversions(out: Path) -> None:
    """Before a conversion: name the cached conversions of other files of the same name (an older draftsmith's,
    keyed otherwise, or another version of the file) and their size; they are the user's to delete, not draftsmith's."""
    stem = out.name.rsplit("-", 1)[0]
    others = sorted(p for p in out.parent.iterdir() if p != out and p.is_dir()
                    and re.fullmatch(rf"{re.escape(stem)}-[0-9a-f]{{16}}", p.name)) if out.parent.is_dir() else []
    if others:
        size = sum(f.stat().st_size for p in others for f in p.rglob("*") if f.is_file())
        print(f"[draftsmith] {out.parent} also holds {len(others)} conversion(s) of other {stem}.gguf files "
              f"({size / 2**20:.0f} MiB: {', '.join(p.name for p in others)}), from an older draftsmith or another "
              "version of the file: delete those no longer used to free the space", flush=True)


def _dequantized() -> dict:
    """`from_pretrained` arguments that unpack a GGUF's weights into plain tensors: transformers 5.2x keeps them
    packed in its own GGUF layers where the `kernels` package finds a matmul kernel, and a plain model cannot take
    packed weights over. Older transformers always unpack (and have no GgufConfig)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a plain safetensors folder under the cache.

    transformers refuses `save_pretrained` on a GGUF-loaded model (it is flagged quantized), so the
    weights are copied into a fresh `from_config` model first.
    """
    out = cache_folder(gguf)
    if (out / "config.json").exists():
        return out
    print(f"[draftsmith] converting {Path(gguf).name} to safetensors once (cached at {out})", flush=True)
    _name_other_conversions(out)
    gguf = Path(gguf).resolve()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  **_dequantized())
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    if hasattr(plain.config, "quantization_config"):   # the weights saved are plain: no GGUF flag on later loads
        del plain.config.quantization_config
    missing = [k for k in plain.load_state_dict(loaded.state_dict(), strict=False).missing_keys
               if not (plain.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise DraftsmithError("The GGUF's weights did not convert into a plain model", f"{len(missing)} unset, e.g. "
                              f"{missing[:3]}", "Report this with your transformers version; a transformers "
                              "folder (save_pretrained) of the same model loads as --target meanwhile")
    plain.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
