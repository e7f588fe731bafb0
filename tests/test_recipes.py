"""Every recipe loads; loading is strict; overrides and the resolved config round-trip."""

import dataclasses

import pytest
import yaml

from draftsmith.errors import DraftsmithError
from draftsmith.train.config import (
    RECIPES_DIR,
    RecipeConfig,
    format_recipes_table,
    list_recipes,
    load_recipe,
    resolve_recipe_path,
    save_resolved,
    to_dict,
)

RECIPES = [name for name, _ in list_recipes()]
ACCELERATE_CONFIGS = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))
QUICK = "smollm2-135m/small_lm-kd-quick"


def write(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = "description: tiny\ntarget:\n  name: tiny-target\n"


def test_repository_has_recipes_and_accelerate_configs():
    assert {"smollm2-135m/small_lm-kd", QUICK} <= set(RECIPES)
    assert [p.stem for p in ACCELERATE_CONFIGS] == ["ddp", "deepspeed_zero2", "deepspeed_zero2_8gpu",
                                                    "deepspeed_zero3", "fsdp"]
    assert {"smollm2-135m/eagle3-ttt", "smollm2-135m/eagle3-ttt-quick", "gemma3-270m/eagle3-ttt",
            "llama-3.1-8b/eagle3-ttt-8gpu"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads(name):
    cfg = load_recipe(name)
    assert isinstance(cfg, RecipeConfig)
    assert cfg.description and "\n" not in cfg.description.strip()
    explicit = (yaml.safe_load(resolve_recipe_path(name).read_text()).get("run") or {}).get("name")
    assert cfg.run.name == (explicit or name.rsplit("/", 1)[-1])


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_header_gives_its_commands(name):
    text = resolve_recipe_path(name).read_text()
    header = text[: text.index("\ndescription:")]
    assert all(line.startswith("#") for line in header.strip().splitlines())
    assert f"draftsmith train {name}" in header
    assert f"-m draftsmith.cli train {name}" in header
    assert "draftsmith export" in header and "draftsmith eval" in header


def test_quick_recipe_values():
    cfg = load_recipe(QUICK)
    assert (cfg.data.max_length, cfg.train.batch_size, cfg.train.max_steps) == (256, 4, 600)
    assert cfg.train.max_minutes is None      # a token budget: a busy machine trains longer, not worse
    assert cfg.drafter.init == "target" and cfg.drafter.num_layers == 4


def test_resolve_recipe_path_forms(tmp_path):
    full = RECIPES_DIR / f"{QUICK}.yaml"
    assert resolve_recipe_path(QUICK) == full
    assert resolve_recipe_path(f"{QUICK}.yaml") == full
    assert resolve_recipe_path(full) == full
    with pytest.raises(DraftsmithError, match="draftsmith recipes"):
        load_recipe("no-such/recipe")


def test_minimal_recipe_takes_defaults(tmp_path):
    cfg = load_recipe(write(tmp_path, MINIMAL, "mini.yaml"))
    assert cfg.loss.name == "forward_kl" and cfg.train.max_grad_norm == 1.0
    assert cfg.run.name == "mini" and cfg.run_dir.as_posix() == "runs/mini"


@pytest.mark.parametrize("text, where, bad, valid", [
    (MINIMAL + "trian:\n  lr: 0.1\n", "top level", "trian", "drafter, data, loss, train"),
    (MINIMAL + "train:\n  learning_rate: 0.1\n", "section train", "learning_rate", "max_steps, batch_size"),
    (MINIMAL.replace("tiny-target\n", "tiny-target\n  revision: main\n"), "section target", "revision",
     "name, dtype"),
])
def test_unknown_key_fails_listing_valid_keys(tmp_path, text, where, bad, valid):
    with pytest.raises(DraftsmithError) as e:
        load_recipe(write(tmp_path, text))
    assert where in str(e.value) and repr(bad) in str(e.value) and valid in str(e.value)


@pytest.mark.parametrize("section, line, key", [
    ("train", "lr: fast", "train.lr"),
    ("train", "batch_size: 2.5", "train.batch_size"),
    ("train", "max_steps: true", "train.max_steps"),
    ("data", "packing: 1", "data.packing"),
    ("data", "max_length: null", "data.max_length"),
    ("drafter", "layers_from_target: [0, x, 2, 3]", "drafter.layers_from_target[1]"),
    ("run", "name: [a]", "run.name"),
])
def test_wrong_type_names_the_key(tmp_path, section, line, key):
    with pytest.raises(DraftsmithError) as e:
        load_recipe(write(tmp_path, MINIMAL + f"{section}:\n  {line}\n"))
    assert key in str(e.value) and ("got:" in str(e.value) or "cannot be null" in str(e.value))


@pytest.mark.parametrize("text, match", [
    ("target:\n  name: t\n", "description is required"),
    ("description: d\n", "target.name is required"),
    ("description: d\ntarget: {}\n", "target.name is required"),
    ("description: d\ntarget: t\n", "target must be a mapping"),
    ("- a\n- b\n", "must be a YAML mapping"),
    (MINIMAL + "train: [\n", "not valid YAML"),
    (MINIMAL + "loss:\n  name: kl\n", "forward_kl"),
    (MINIMAL + "train:\n  mixed_precision: fp8\n", "auto, no, bf16, fp16"),
    (MINIMAL + "drafter:\n  num_layers: 2\n  layers_from_target: [0, 1, 2]\n", "one target layer per"),
])
def test_invalid_recipes_fail_clearly(tmp_path, text, match):
    with pytest.raises(DraftsmithError, match=match):
        load_recipe(write(tmp_path, text))


def test_int_accepted_for_float_fields(tmp_path):
    cfg = load_recipe(write(tmp_path, MINIMAL + "train:\n  lr: 1\n  max_grad_norm: 2\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_overrides_float_list_null_bool():
    cfg = load_recipe(QUICK, [
        "train.lr=1e-4",
        "drafter.layers_from_target=[0,5,10,20]",
        "train.max_grad_norm=null",
        "data.packing=true",
        "train.max_minutes=2",
        "run.name=my-run",
    ])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.drafter.layers_from_target == [0, 5, 10, 20]
    assert cfg.train.max_grad_norm is None
    assert cfg.data.packing is True
    assert cfg.train.max_minutes == 2.0
    assert cfg.run.name == "my-run"


def test_override_run_name_null_means_recipe_stem():
    assert load_recipe(QUICK, ["run.name=null"]).run.name == "small_lm-kd-quick"


@pytest.mark.parametrize("override, match", [
    ("train.learning_rate=1", "Valid keys: max_steps"),
    ("trainer.lr=1", "Sections: target, drafter"),
    ("lr=1", "section.key"),
    ("train.lr", "section.key=value"),
    ("train.lr=abc", "train.lr must be a number"),
    ("data.packing=1", "data.packing must be true or false"),
])
def test_bad_overrides_fail(override, match):
    with pytest.raises(DraftsmithError, match=match):
        load_recipe(QUICK, [override])


@pytest.mark.parametrize("name", RECIPES)
def test_resolved_config_round_trips(tmp_path, name):
    layers = list(range(1, load_recipe(name).drafter.num_layers + 1))
    cfg = load_recipe(name, ["drafter.init=target", f"drafter.layers_from_target={layers}", "train.lr=1e-5"])
    path = save_resolved(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_recipe(path) == cfg
    assert list(yaml.safe_load(path.read_text())) == ["description", *(
        f.name for f in dataclasses.fields(RecipeConfig) if f.name != "description")]
    assert to_dict(cfg)["train"]["lr"] == 1e-5


def test_recipes_table_lists_names_and_descriptions(tmp_path):
    write(tmp_path, MINIMAL, "a.yaml")
    (tmp_path / "accelerate").mkdir()
    write(tmp_path / "accelerate", "distributed_type: MULTI_GPU\n", "ddp.yaml")
    rows = list_recipes(tmp_path)
    assert rows == [("a", "tiny")]
    table = format_recipes_table(rows)
    assert table.splitlines()[0].split() == ["recipe", "description"]
    assert "a" in table and "tiny" in table


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(path.stem, "DEEPSPEED")
    assert cfg.distributed_type.value == expected
    assert cfg.num_processes == (8 if "8gpu" in path.stem else 2) and cfg.mixed_precision == "bf16"
    if expected == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(path.stem.removesuffix("_8gpu")[-1])
    assert f"accelerate launch --config_file recipes/accelerate/{path.name}" in path.read_text()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_dry_runs_on_the_meta_device(name, capsys):
    """CI runs the dry run of every recipe: target and drafter build (meta device), shapes and memory print."""
    from draftsmith.cli import main

    assert main(["train", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "total (estimate)" in out and "[dry run] target" in out


def test_cluster_recipe_dry_run_shards_with_zero2(capsys):
    from draftsmith.train.config import load_recipe
    from draftsmith.train.dry_run import dry_run

    cfg = load_recipe("llama-3.1-8b/eagle3-ttt-8gpu")
    one = dry_run(cfg, gpus=1, zero=0)
    eight = dry_run(cfg, gpus=8, zero=2)
    assert 8.0e9 < one["target_params"] < 8.1e9                       # Llama-3.1-8B
    assert 4.0e8 < one["drafter_trainable"] < 4.5e8
    assert eight["memory_per_gpu_bytes"] < one["memory_per_gpu_bytes"] < 80 * 1024 ** 3
    assert eight["tokens_per_step"] == 8 * 8 * 2048
    with pytest.raises(DraftsmithError, match="zero"):
        dry_run(cfg, gpus=8, zero=5)
