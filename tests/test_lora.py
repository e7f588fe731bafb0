"""LoRA drafters through peft: drafter.lora is checked, only the adapters (and a parallel drafter's
mask row) train, the export merges them into a plain transformers folder whose logits equal the
adapted model's, --resume continues bit-identically from the adapters, and target.adapter trains
against the base model with a peft adapter merged in."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from draftsmith.cli import main
from draftsmith.errors import DraftsmithError
from draftsmith.models.lora import count_parameters, lora_settings
from draftsmith.train.config import load_recipe, save_resolved

from conftest import prompts
from test_parallel import setup  # noqa: F401  (tiny saved target, chats and a recipe)

LORA = "drafter.lora={r: 4, alpha: 8}"


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


def ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step-{step:07d}"


def test_lora_settings_are_checked_and_completed(setup, tmp_path):  # noqa: F811
    assert lora_settings({"r": 8}) == {"r": 8, "alpha": 32.0, "dropout": 0.0, "target_modules": None}
    assert lora_settings(None) is None
    for raw, match in [({"rank": 8}, "Valid keys: r, alpha"), ({"r": 0}, "lora.r"), ({"dropout": 1.0}, "lora.dropout"),
                       ({"target_modules": "q_proj"}, "lora.target_modules"), (5, "mapping")]:
        with pytest.raises(DraftsmithError, match=match):
            lora_settings(raw)
    recipe = str(setup / "recipe.yaml")
    with pytest.raises(DraftsmithError, match="small_lm and parallel"):
        load_recipe(recipe, ["drafter.kind=eagle", LORA])
    with pytest.raises(DraftsmithError, match="init=target"):
        load_recipe(recipe, ["drafter.init=random", LORA])
    cfg = load_recipe(recipe, [LORA, "target.adapter=null"])
    assert cfg.drafter.lora == {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None}
    assert load_recipe(save_resolved(cfg, tmp_path)) == cfg


@pytest.mark.parametrize("kind", ["small_lm", "parallel"])
def test_only_the_adapters_train(setup, kind):  # noqa: F811
    from draftsmith.models.target import load_target
    from draftsmith.train.run import build_drafter

    cfg = load_recipe(str(setup / "recipe.yaml"), [f"drafter.kind={kind}", "drafter.num_layers=2", LORA])
    target = load_target(str(setup / "target"), "fp32", device="cpu")
    module = build_drafter(cfg, target.model, None, 0)
    c = target.model.config
    hidden, inter, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    per_layer = 4 * sum(i + o for i, o in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                                           (hidden, inter), (hidden, inter), (inter, hidden)])
    mask_row = hidden if kind == "parallel" else 0
    trainable, total = count_parameters(module)
    assert trainable == 2 * per_layer + mask_row and total > 10 * trainable
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens" in n for n in names)


def train_lora(setup, tmp_path, name, *extra):  # noqa: F811
    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", f"run.name={name}",
                 "drafter.kind=small_lm", LORA, "train.lr=1e-2", "checkpoint.every=2", "checkpoint.keep=4",
                 *extra]) == 0
    return tmp_path / name


def test_export_merges_the_adapters_into_a_plain_model_with_the_same_logits(setup, tmp_path):  # noqa: F811
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from draftsmith.models.lora import peft_config

    run = train_lora(setup, tmp_path, "lora")
    summary = json.loads((run / "summary.json").read_text())   # what the LoRA vs full comparison reads
    assert summary["drafter_params"]["trainable"] < summary["drafter_params"]["frozen"] / 10
    assert summary["peak_rss_gib"] > 0.1
    folder = ckpt(run, 6) / "drafter"
    saved = load_file(folder / "model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())   # the adapters moved
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "draftsmith_lora" not in config and config["draftsmith_lora_merged"]["r"] == 4
    assert not any("lora" in k or "base_layer" in k for k in load_file(out / "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    # the adapted model, unmerged: base + adapters exactly as training left them
    adapted = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    get_peft_model(adapted, peft_config(config["draftsmith_lora_merged"]))
    adapted.load_state_dict(saved, strict=False)
    ids = torch.tensor(prompts(2, length=10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert main(["eval", "--target", str(setup / "target"), "--drafter", str(out), "--bench",
                 str(setup / "bench.jsonl"), "--max-new-tokens", "12", "--k", "3", "--device", "cpu",
                 "--no-hf-assisted", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["lossless_match_rate"] == 1.0


def test_resume_from_adapters_ends_where_an_uninterrupted_run_does(setup, tmp_path):  # noqa: F811
    run = train_lora(setup, tmp_path, "whole")
    final = load_file(ckpt(run, 6) / "drafter" / "model.safetensors")
    shutil.rmtree(ckpt(run, 6))                          # as if the run had stopped after step 4
    train_lora(setup, tmp_path, "whole", "--resume")
    resumed = load_file(ckpt(run, 6) / "drafter" / "model.safetensors")
    assert final.keys() == resumed.keys()
    for key in final:
        assert torch.equal(final[key], resumed[key]), key


def test_target_adapter_is_merged_at_load(setup, tmp_path):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from draftsmith.models.lora import adapted_target
    from draftsmith.models.target import load_target

    base = AutoModelForCausalLM.from_pretrained(setup / "target")
    tuned = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))   # random B: the adapter changes the model
    tuned.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor(prompts(1, length=8))
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits
    target = adapted_target(load_target(str(setup / "target"), "fp32", device="cpu"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(target.model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=tuned",
                 f"target.adapter={tmp_path / 'adapter'}", "train.max_steps=0"]) == 0
    with pytest.raises(DraftsmithError, match="adapter_config.json"):
        adapted_target(target, tmp_path)


def test_tied_parallel_drafter_saves_once_and_merges_with_its_mask_row(tmp_path):
    """SmolLM2-style tied embeddings: peft wraps the embedding and the LM head around the same tensors;
    the checkpoint holds them once and the merged export keeps the trained mask row."""
    from transformers import LlamaForCausalLM

    from draftsmith.models.lora import apply_lora, merged_from_folder
    from draftsmith.models.parallel import build_parallel

    from conftest import VOCAB, perturbed, tiny_llama
    from test_parallel import drafter_spec

    config = tiny_llama(0, layers=4).config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    target = LlamaForCausalLM(config)
    model = apply_lora(build_parallel(target, drafter_spec()).float(), lora_settings({"r": 4}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)      # trained-looking adapters and mask row
    model.save_pretrained(tmp_path, state_dict=model.state_dict())   # as the trainer saves a checkpoint
    merged = merged_from_folder(tmp_path).eval()
    ids = torch.tensor([prompts(1, length=8)[0] + [VOCAB] * 3])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits[..., :VOCAB],
                                   model.eval()(input_ids=ids).logits[..., :VOCAB], rtol=1e-4, atol=1e-4)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert not torch.equal(merged.model.embed_tokens.weight[VOCAB], target.model.embed_tokens.weight.mean(0))


def clear_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "draftsmith: error:" in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_unknown_lora_target_modules_are_refused_by_name(setup, tmp_path, capsys):  # noqa: F811
    for modules in ("[nope]", "[q_proj, nope]"):       # peft alone ignores a bad name beside a good one
        assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", f"run.name=m{len(modules)}",
                     f"drafter.lora={{r: 4, alpha: 8, target_modules: {modules}}}", "train.max_steps=0"]) == 2
        clear_error(capsys, "drafter.lora.target_modules names modules the drafter does not have", "['nope']",
                    "q_proj, up_proj, v_proj")


@pytest.fixture(scope="module")
def adapter(setup, tmp_path_factory):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(setup / "target")
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    return folder


def _set_rank(folder):
    raw = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**raw, "r": 8}))


def _drop_v_proj(folder):
    from safetensors.torch import save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "v_proj" not in k}, str(folder / "adapter_model.safetensors"))


BROKEN_ADAPTERS = {
    "missing": (lambda f: shutil.rmtree(f), "no adapter_config.json"),
    "config not JSON": (lambda f: (f / "adapter_config.json").write_text("{r: 2"), "adapter_config.json is not valid JSON"),
    "config a list": (lambda f: (f / "adapter_config.json").write_text("[]"), "must hold a JSON object"),
    "pickle only": (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"), "is a pickle"),
    "truncated weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10"), "cannot be applied"),
    "other rank": (_set_rank, "cannot be applied to this target"),
    "unknown peft type": (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "NOPE"}'), "cannot be applied"),
    "tensors missing": (_drop_v_proj, "weights lack tensors its adapter_config.json implies"),
}


@pytest.mark.parametrize("broken", list(BROKEN_ADAPTERS))
def test_broken_target_adapter_is_refused(setup, adapter, tmp_path, capsys, broken):  # noqa: F811
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    edit, needle = BROKEN_ADAPTERS[broken]
    edit(folder)
    assert main(["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "run.name=x",
                 f"target.adapter={folder}", "train.max_steps=0"]) == 2
    clear_error(capsys, "target.adapter", needle)
