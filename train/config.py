"""Recipes: one YAML file per training run, loaded strictly into typed dataclasses.

A recipe has a one-line `description` and one mapping per section (target, drafter, data,
loss, train, eval, checkpoint, log, run). Values are plain (`loss: {name: forward_kl}`),
`null` means off / use the default rule. Command-line overrides take the form
`section.key=value`, the value read as YAML (`train.lr=1e-4`, `drafter.layers_from_target=[0,5]`,
`run.name=null`). Unknown keys fail with the list of valid ones; wrong types name the key.
The resolved config (defaults and overrides applied) is written into the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, get_type_hints

import yaml

from draftsmith.distill.losses import LOSSES
from draftsmith.distill.objective import POSITION_WEIGHTS
from draftsmith.errors import DraftsmithError
from draftsmith.models import DRAFTER_KINDS
from draftsmith.models.lora import lora_settings
from draftsmith.train.schema import (Dumper, Loader, Section, apply_override, check, check_choice, parse_yaml,
                                     section_from_dict, unknown_key)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
"""The repository's `recipes/` folder; names like `smollm2-135m/small_lm-kd` resolve under it."""

_ACCELERATE_DIR = "accelerate"

MAX_PARALLEL_K = 64
"""The most tokens a parallel drafter may draft per forward: training holds parallel_k - 1 mask blocks per
sequence (memory grows with it), and --k auto measures the target's cost curve up to 64 new tokens."""
"""Subfolder of RECIPES_DIR holding `accelerate launch` configs, not recipes."""


# ---------------------------------------------------------------- sections

@dataclass
class TargetConfig(Section):
    section: ClassVar[str] = "target"
    choices: ClassVar = {"dtype": ("auto", "fp32", "bf16", "fp16")}
    name: str
    """Asset name (`smollm2-135m-instruct`, `gemma3-270m`), a model folder, a .gguf file or a hub id."""
    dtype: str = "auto"
    """auto | fp32 | bf16 | fp16 (auto: bf16 on a GPU that has it, else fp32)."""
    adapter: str | None = None
    """A peft adapter folder merged into the target at load (a LoRA-tuned target); null = none."""

    def validate(self) -> None:
        check(bool(self.name.strip()), "target.name", self.name,
              "Name an asset (smollm2-135m-instruct), a model folder, a .gguf file or a hub id")


@dataclass
class DrafterConfig(Section):
    section: ClassVar[str] = "drafter"
    choices: ClassVar = {"init": ("target", "random")}
    at_least: ClassVar = {"num_layers": 1, "hidden_size": 1, "intermediate_size": 1, "feature_noise": 0.0,
                          "draft_vocab_size": 1, "ttt_steps": 1, "parallel_k": 1, "cod_floor": 0.0,
                          "block_size": 2, "max_anchors": 1, "markov_rank": 0}
    above: ClassVar = {"ttt_decay": 0.0, "cod_ratio": 0.0}
    kind: str = "small_lm"
    """Drafter architecture, a key of the drafter registry in draftsmith.models."""
    num_layers: int = 4
    """Decoder layers in the drafter."""
    hidden_size: int | None = None
    """Hidden width; null = the target's."""
    intermediate_size: int | None = None
    """MLP width; null = the target's."""
    init: str = "target"
    """target (copy weights from the target's layers) | random."""
    layers_from_target: list[int] | None = None
    """Target layers copied into the drafter (init: target); null = evenly spaced over the target."""
    freeze_embeddings: bool = False
    """small_lm: keep the token embeddings and LM head (the target's, with init: target) frozen."""
    feature_noise: float = 0.1
    """eagle: uniform noise on the input hidden states, as a fraction of their std (EAGLE's robustness trick)."""
    draft_vocab_size: int | None = None
    """eagle3: tokens in the draft vocabulary, the most frequent assistant tokens of the training data;
    null = a quarter of the target's vocabulary."""
    aux_layers: list[int] | None = None
    """eagle3 (3), dflash / dspark (any number): the target layers whose outputs are fused (0-based output indices, transformers'
    hidden_states[i + 1]); null = (1, N/2 - 1, N - 4), vLLM's and SGLang's default."""
    ttt_steps: int = 7
    """eagle3: training-time-test steps unrolled per sequence (the head feeds its own features back)."""
    ttt_decay: float = 0.8
    """eagle3: weight of unrolled step i is ttt_decay ** i."""
    init_from: str | None = None
    """eagle / eagle3: start from a trained head instead (a folder written by `draftsmith export` in
    any format, or a run's checkpoints/step-N/drafter): its layout and draft vocabulary are kept,
    the optimizer and schedule start fresh. parallel: start from any transformers causal LM folder
    sharing the target's tokenizer (a small model of the family, an exported small_lm or parallel
    drafter). eagle3 with parallel: a P-EAGLE head, or a plain EAGLE-3 head that gains the mask
    parameters. null = build a new head / copy the target's layers."""
    parallel: bool = False
    """eagle3: P-EAGLE — the head drafts parallel_k tokens in one forward from mask-token rows, trained
    with mask blocks and conditional drop-token instead of the training-time test (models/peagle.py)."""
    mask_token_id: int | None = None
    """eagle3 with parallel: the target id whose embedding the head learns as its mask token; null = the
    tokenizer's mask token, an embedding row no token uses, else the id the training data holds least."""
    parallel_k: int = 4
    """parallel, eagle3 with parallel: tokens drafted per forward that training covers (depth 0 plus
    parallel_k - 1 mask blocks)."""
    cod_ratio: float = 0.7
    """parallel, eagle3 with parallel: conditional drop-token keeps a share max(cod_ratio ** d, cod_floor)
    of depth d (PARD: 0.7)."""
    cod_floor: float = 0.2
    """parallel, eagle3 with parallel: the least share of a depth kept by conditional drop-token (PARD: 0.2)."""
    block_size: int = 8
    """dflash / dspark: tokens in a block, one drafter forward (dflash drafts block_size - 1 of them: its
    first slot is the anchor; dspark drafts block_size)."""
    max_anchors: int = 64
    """dflash / dspark: anchor positions drawn per training sequence; every anchor's block is trained in
    the same forward (memory grows with max_anchors x block_size)."""
    markov_rank: int | None = None
    """dspark: rank of the Markov logit-bias head (the previous token's bias on the next draft's logits);
    0 = none; null = 256 (speculators' default)."""
    confidence_head: bool | None = None
    """dspark: a head predicting each draft's acceptance (trained with loss.confidence_weight x BCE; `--k
    auto` uses it); null = on."""
    lora: dict | None = None
    """small_lm / parallel: train LoRA adapters through peft on frozen base weights, a mapping
    {r, alpha, dropout, target_modules} (defaults 16, 32, 0.0, null = every linear layer but the LM
    head); export --format hf merges them. null = train the weights themselves."""

    def validate(self) -> None:
        # prompt lookup has no weights: nothing to train
        check_choice("drafter.kind", self.kind, [k for k in DRAFTER_KINDS if k != "prompt_lookup"])
        check(self.init_from is None or self.kind in ("eagle", "eagle3", "parallel", "dflash", "dspark"),
              "drafter.init_from", self.init_from,
              "Warm starts are for the eagle, eagle3, parallel, dflash and dspark drafters; set drafter.init_from=null")
        block = self.kind in ("dflash", "dspark")
        check(self.mask_token_id is None or self.parallel or block, "drafter.mask_token_id",
              self.mask_token_id, "A mask token id is for eagle3 with parallel: true, dflash and dspark; else set it to null")
        check(not block or self.block_size <= MAX_PARALLEL_K, "drafter.block_size", self.block_size,
              f"Use 2 to {MAX_PARALLEL_K} (DFlash trains 8-16)")
        check(self.kind == "dspark" or (self.markov_rank is None and self.confidence_head is None),
              "drafter.markov_rank / confidence_head", [self.markov_rank, self.confidence_head],
              "The Markov and confidence heads are dspark's: set them to null, or drafter.kind=dspark")
        check(not (self.kind == "dspark" and self.confidence_head is not False and self.markov_rank == 0),
              "drafter.markov_rank", self.markov_rank,
              "dspark's confidence head reads the Markov embedding: use markov_rank > 0, or confidence_head: false")
        check(self.cod_ratio <= 1.0 and self.cod_floor <= 1.0, "drafter.cod_ratio / cod_floor",
              [self.cod_ratio, self.cod_floor], "Use shares in (0, 1], e.g. 0.7 and 0.2 as PARD")
        check(not self.parallel or self.kind == "eagle3", "drafter.parallel", f"kind {self.kind}",
              "parallel: true makes an eagle3 head draft in parallel (P-EAGLE); kind parallel always does: "
              "set drafter.parallel=false, or drafter.kind=eagle3")
        check(self.mask_token_id is None or self.mask_token_id >= 0, "drafter.mask_token_id", self.mask_token_id,
              "Use an id >= 0 of the target's vocabulary, or null to pick an unused one")
        if self.parallel or self.kind == "parallel":
            check(2 <= self.parallel_k <= MAX_PARALLEL_K, "drafter.parallel_k", self.parallel_k,
                  f"A parallel drafter drafts parallel_k tokens per forward from parallel_k - 1 mask rows: use 2 to "
                  f"{MAX_PARALLEL_K} (PARD-2 trains 16; 1 would be an ordinary drafter, e.g. kind small_lm)")
        if self.lora is not None:
            self.lora = lora_settings(self.lora)
            check(self.kind in ("small_lm", "parallel"), "drafter.lora", self.kind,
                  "LoRA adapters are for the small_lm and parallel drafters; set drafter.lora=null")
            check(self.init == "target" or self.init_from is not None, "drafter.lora", "init: random",
                  "LoRA adapts weights that mean something: use drafter.init=target (or init_from for parallel)")
        if self.aux_layers is not None:
            count = None if self.kind in ("dflash", "dspark") else 3      # block drafters tap any number
            check((len(self.aux_layers) == count if count else 1 <= len(self.aux_layers) <= 64)
                  and len(set(self.aux_layers)) == len(self.aux_layers) and min(self.aux_layers) >= 0,
                  "drafter.aux_layers", self.aux_layers,
                  f"Give {count or '1 to 64'} distinct target layer indices >= 0, or null")
            if self.aux_layers != sorted(self.aux_layers):
                # SGLang and vLLM concatenate the tapped layers in layer order: a head trained on
                # another order would read its inputs permuted there
                print(f"[draftsmith] drafter.aux_layers {self.aux_layers} sorted to {sorted(self.aux_layers)}: "
                      "serving engines fuse the tapped layers in layer order", file=sys.stderr, flush=True)
                self.aux_layers = sorted(self.aux_layers)
        layers = self.layers_from_target
        if layers is None:
            return
        check(self.init == "target", "drafter.layers_from_target", layers,
              "Layers are copied only with drafter.init=target; set drafter.layers_from_target=null")
        check(len(layers) == self.num_layers, "drafter.layers_from_target", layers,
              f"Give one target layer per drafter layer ({self.num_layers}), or null for evenly spaced")
        check(all(i >= 0 for i in layers) and len(set(layers)) == len(layers),
              "drafter.layers_from_target", layers, "Use distinct layer indices >= 0")


@dataclass
class DataConfig(Section):
    section: ClassVar[str] = "data"
    at_least: ClassVar = {"max_length": 2, "heldout_fraction": 0.0, "max_conversations": 1,
                          "max_malformed_fraction": 0.0}
    source: str = "sharegpt"
    """sharegpt (the bundled ShareGPT V3 asset) | a .jsonl file of conversations | a saved dataset folder |
    a folder written by `draftsmith data prepare` (already tokenised; its data settings must match)."""
    max_length: int = 512
    """Tokens per training sequence; longer conversations are truncated."""
    packing: bool = False
    """Concatenate conversations into full max_length rows instead of padding each."""
    heldout_fraction: float = 0.02
    """Share of conversations kept out of training for evaluation."""
    max_conversations: int | None = None
    """Use at most this many conversations; null = all."""
    cache_dir: str | None = None
    """Where tokenized datasets are cached; null = the default cache folder."""
    teacher: str = "online"
    """Where the target's signals come from: online (the target runs in every training step) | cache:DIR
    (a folder written by `draftsmith data cache` for this recipe's data: the target's layers are not
    loaded on the training device; a top-k cache approximates the loss, docs/data.md)."""
    max_malformed_fraction: float = 0.1
    """Refuse the data when more than this share of its records are malformed (not a conversation:
    unknown role, empty text, no assistant turn, not JSON or not UTF-8); the packaged ShareGPT has 2%."""

    def validate(self) -> None:
        check(bool(self.source.strip()), "data.source", self.source,
              "Use sharegpt, a path to a .jsonl file, a saved dataset folder or a prepared data folder")
        check(self.heldout_fraction < 1.0, "data.heldout_fraction", self.heldout_fraction,
              "Use a fraction in [0, 1), e.g. 0.02")
        check(self.teacher == "online" or (self.teacher.startswith("cache:") and bool(self.teacher[6:].strip())),
              "data.teacher", self.teacher, "Use one of: online, cache:DIR (a folder written by `draftsmith data cache`)")
        check(self.max_malformed_fraction <= 1.0, "data.max_malformed_fraction", self.max_malformed_fraction,
              "Use a fraction in [0, 1], e.g. 0.1 (1 accepts any share of malformed records)")


@dataclass
class LossConfig(Section):
    section: ClassVar[str] = "loss"
    at_least: ClassVar = {"beta": 0.0, "top_k": 1, "data_ce_weight": 0.0, "feature_weight": 0.0,
                          "confidence_weight": 0.0}
    above: ClassVar = {"temperature": 0.0, "gamma": 0.0}
    name: str = "forward_kl"
    """A key of draftsmith.distill.losses.LOSSES (forward_kl = KL(p || q), p the target's; tvd = 1 - alpha;
    nla = -log alpha; lk_hybrid = lambda KL + (1 - lambda) TV, lambda = exp(-3 alpha)); loss.mix replaces it."""
    mix: dict | None = None
    """A weighted combination of named losses, e.g. {ce: 0.1, tvd: 0.9} (DSpark); `ce` = target_ce.
    null = loss.name alone."""
    position_weights: str | None = None
    """Weights along the draft (training-time-test steps, parallel depths): uniform | exp_decay |
    reach (the target's chance to reach the position, PARD-2's CAT) | accepted_length (the gradient of
    the implied tau); null = the kind's default (eagle3: drafter.ttt_decay ** i, else uniform)."""
    gamma: float = 4.0
    """exp_decay: position i weighs exp(-i / gamma)."""
    temperature: float = 1.0
    """Softmax temperature applied to both p and q."""
    beta: float = 0.5
    """Mixing weight of the JSD (loss jsd only)."""
    top_k: int = 10
    """Target tokens kept per position (loss topk_forward_kl only)."""
    data_ce_weight: float = 0.0
    """Weight of an added cross-entropy on the data's own tokens; 0 = off."""
    feature_weight: float = 1.0
    """eagle: weight of the SmoothL1 feature regression (features divided by their std)."""
    confidence_weight: float = 1.0
    """dspark: weight of the confidence head's BCE against each draft's acceptance (DSpark: 1)."""

    def validate(self) -> None:
        check_choice("loss.name", self.name, sorted(LOSSES))
        check(self.beta <= 1.0, "loss.beta", self.beta, "Use a value in [0, 1]")
        check(self.position_weights in (*POSITION_WEIGHTS, None), "loss.position_weights", self.position_weights,
              f"Use one of: {', '.join(POSITION_WEIGHTS)}, or null for the drafter kind's default")
        if self.mix is not None:
            names = sorted(LOSSES)
            check(bool(self.mix), "loss.mix", self.mix, f"Give {{name: weight}} pairs of {', '.join(names)}, or null")
            for name, weight in self.mix.items():
                check_choice("loss.mix key", name, names)
                check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
                      and weight >= 0, f"loss.mix.{name}", weight, "Use a finite weight >= 0, e.g. {ce: 0.1, tvd: 0.9}")
            check(any(w > 0 for w in self.mix.values()), "loss.mix", self.mix, "Give at least one weight > 0")
            self.mix = {name: float(w) for name, w in self.mix.items()}
        data_only = {n for n, w in (self.mix or {self.name: 1.0}).items() if w} == {"data_ce"}
        check(not (data_only and self.position_weights == "accepted_length"), "loss.position_weights",
              self.position_weights, "accepted_length weighs positions by the drafter's acceptance of the target's "
              "distribution, which a data_ce-only loss never reads: use uniform or exp_decay, or add a target loss")


@dataclass
class TrainConfig(Section):
    section: ClassVar[str] = "train"
    choices: ClassVar = {"mixed_precision": ("auto", "no", "bf16", "fp16"), "optimizer": ("adamw", "muon")}
    at_least: ClassVar = {"max_steps": 0, "batch_size": 1, "grad_accum": 1, "weight_decay": 0.0,
                          "warmup_steps": 0, "min_lr_ratio": 0.0, "seed": 0, "trim_heap_every": 0}
    above: ClassVar = {"lr": 0.0, "muon_lr": 0.0, "max_grad_norm": 0.0, "max_minutes": 0.0}
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 4
    """Sequences per process per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """Weight decay (AdamW, and Muon's matrices)."""
    optimizer: str = "adamw"
    """adamw | muon (torch.optim.Muon for the 2-D weight matrices of hidden layers at muon_lr, AdamW at lr
    for the rest: embeddings, LM heads, norms, biases; speculators' default)."""
    muon_lr: float = 0.02
    """Peak learning rate of Muon's matrices (optimizer muon only); the same schedule as lr."""
    warmup_steps: int = 50
    """Linear warm-up steps, then cosine decay to lr * min_lr_ratio."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; null = no clipping."""
    mixed_precision: str = "auto"
    """auto | no | bf16 | fp16 (auto: the trainer picks bf16 where the hardware runs it fast)."""
    seed: int = 0
    """Seed for the drafter's initialisation, data order and held-out split."""
    max_minutes: float | None = None
    """Stop early (still checkpointing) once the wall clock passes this; null = no limit."""
    trim_heap_every: int = 10
    """CPU training: hand glibc's free heap back to the OS every this many optimizer steps (0 = never).
    Without it a CPU run's resident memory grows with the steps (5.2 GiB after 600 eagle3-ttt-quick steps,
    0.37 GiB of live tensors); every step costs ~12% tokens/s (bench/results/cpu-train-memory)."""

    def validate(self) -> None:
        check(self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "Use a fraction in [0, 1]")


@dataclass
class EvalConfig(Section):
    section: ClassVar[str] = "eval"
    at_least: ClassVar = {"every": 1, "batches": 1, "k_max": 1}
    every: int = 100
    """Evaluate on held-out data every this many steps (and at the end)."""
    batches: int = 8
    """Held-out batches per evaluation."""
    k_max: int = 8
    """Draft positions scored: alpha_1..alpha_k_max and expected tau are reported per k."""


@dataclass
class CheckpointConfig(Section):
    section: ClassVar[str] = "checkpoint"
    at_least: ClassVar = {"every": 1, "keep": 1}
    every: int = 100
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep: int = 2
    """Most recent checkpoints kept on disk."""


@dataclass
class LogConfig(Section):
    section: ClassVar[str] = "log"
    at_least: ClassVar = {"every": 1}
    every: int = 10
    """Log training metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files into the run folder."""


@dataclass
class RunConfig(Section):
    section: ClassVar[str] = "run"
    name: str | None = None
    """Run folder name under out_dir; null = the recipe file's stem."""
    out_dir: str = "runs"
    """Folder holding run folders."""

    def validate(self) -> None:
        if self.name is not None:
            check(bool(self.name.strip()) and "/" not in self.name and "\\" not in self.name,
                  "run.name", self.name, "Use a plain folder name without slashes, or null")
        check(bool(self.out_dir.strip()), "run.out_dir", self.out_dir, "Use a folder path, e.g. runs")


@dataclass
class RecipeConfig:
    """A whole recipe: `description` plus one dataclass per section."""

    description: str
    """One line, shown by `draftsmith recipes`."""
    target: TargetConfig
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        check(isinstance(self.description, str) and bool(self.description.strip())
              and "\n" not in self.description.strip(), "description", self.description,
              "Write a one-line description: what the recipe trains, against which target")

    @property
    def run_dir(self) -> Path:
        """`run.out_dir / run.name` (run.name is filled from the recipe's stem by load_recipe)."""
        if self.run.name is None:
            raise DraftsmithError("run.name is not set", fix="Set run.name, or load the recipe with load_recipe")
        return Path(self.run.out_dir) / self.run.name


SECTIONS: dict[str, type[Section]] = {
    name: hint for name, hint in get_type_hints(RecipeConfig).items() if name != "description"
}
"""Section name -> its dataclass, in recipe order."""


# ---------------------------------------------------------------- loading

def _from_dict(raw: object) -> RecipeConfig:
    if not isinstance(raw, dict):
        raise DraftsmithError("a recipe must be a YAML mapping of sections", type(raw).__name__,
                              f"Start from a recipe under {RECIPES_DIR}")
    top_keys = ["description", *SECTIONS]
    for key in raw:
        if key not in top_keys:
            raise unknown_key("the recipe's top level", key, top_keys)
    if "description" not in raw:
        raise DraftsmithError("description is required", fix="Add a one-line `description:` at the top")
    sections = {name: section_from_dict(cls, name, raw.get(name) or {}) for name, cls in SECTIONS.items()}
    return RecipeConfig(description=raw["description"], **sections)


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A YAML file path, or a recipe name under RECIPES_DIR (`smollm2-135m/small_lm-kd[.yaml]`)."""
    path = Path(name_or_path).expanduser()
    candidates = [path, RECIPES_DIR / path]
    if path.suffix not in (".yaml", ".yml"):
        candidates.append(RECIPES_DIR / f"{path}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DraftsmithError("recipe not found", str(name_or_path),
                          "List recipes with `draftsmith recipes`, or pass a path to a YAML file")


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> RecipeConfig:
    """Load a recipe (a path or a name under RECIPES_DIR), apply overrides, validate.

    `run.name` left null is filled with the recipe file's stem, so the result is fully resolved.
    """
    path = resolve_recipe_path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DraftsmithError(f"{path} is not a YAML recipe: not UTF-8 text ({err.reason} at byte {err.start})",
                              fix="Give a recipe YAML file; list them with `draftsmith recipes`") from None
    raw = parse_yaml(text, str(path))
    raw = {} if raw is None else raw
    try:
        if isinstance(raw, dict):
            for override in overrides:
                apply_override(raw, override, SECTIONS)
        cfg = _from_dict(raw)
    except DraftsmithError as e:
        raise DraftsmithError(f"{path}: {e}") from None
    if cfg.run.name is None:
        cfg.run.name = path.stem
    return cfg


def to_dict(cfg: RecipeConfig) -> dict:
    """The recipe as plain nested dicts, in recipe order (description, then sections)."""
    return dataclasses.asdict(cfg)


def save_resolved(cfg: RecipeConfig, run_dir: str | Path) -> Path:
    """Write the resolved recipe to `run_dir/config.yaml`; load_recipe of that file gives `cfg`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    text = yaml.dump(to_dict(cfg), Dumper=Dumper, sort_keys=False, width=1000, allow_unicode=True)
    out.write_text("# Resolved recipe: defaults and overrides applied.\n" + text, encoding="utf-8")
    return out


def changed_settings(run_dir: str | Path, cfg: RecipeConfig) -> dict[str, tuple[object, object]]:
    """`section.key` -> (the run's saved value, `cfg`'s value) for every setting that differs from the
    run folder's config.yaml (a key one side lacks counts as changed); {} without a saved config."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    saved = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    saved = saved if isinstance(saved, dict) else {}
    flat = lambda d: {f"{s}.{k}": v for s, sec in d.items() if isinstance(sec, dict) for k, v in sec.items()}  # noqa: E731
    old, new = flat(saved), flat(to_dict(cfg))
    missing = object()
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if old.get(key, missing) != new.get(key, missing)}


# ---------------------------------------------------------------- listing

def list_recipes(root: str | Path | None = None) -> list[tuple[str, str]]:
    """(name, description) of every `*.yaml` under `root` (default RECIPES_DIR), accelerate configs excepted."""
    root = Path(root) if root is not None else RECIPES_DIR
    rows = []
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root)
        if rel.parts[0] == _ACCELERATE_DIR:
            continue
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
            description = str(raw.get("description", "")) if isinstance(raw, dict) else ""
        except (yaml.YAMLError, UnicodeDecodeError):
            description = "(invalid YAML)"
        rows.append((rel.with_suffix("").as_posix(), description))
    return rows


def format_recipes_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns, recipe name and description, for `draftsmith recipes`."""
    if not rows:
        return "no recipes found"
    width = max(len("recipe"), *(len(name) for name, _ in rows))
    lines = [f"{'recipe':<{width}}  description", f"{'-' * width}  {'-' * len('description')}"]
    lines += [f"{name:<{width}}  {description}" for name, description in rows]
    return "\n".join(lines)
