"""Kinds `dflash` / `dspark` as vLLM speculators' `dflash` / `dspark` checkpoints (models/block_formats.py,
docs/formats.md): every tensor name and shape and every config field the docs list; the folder reads back
into the same draft logits (tapped layers put in layer order, a layer tapped twice merged, a full-vocabulary
head without d2t / t2d); bad configs refused by name; `draftsmith export` writes it (and refuses sglang)
and `load_drafter` reads it. No speculators needed: bench/speculators_block_peer.py checks the same
folders against speculators 0.9.0 itself."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftsmith.errors import DraftsmithError
from draftsmith.models import load_drafter
from draftsmith.models.block_drafter import BlockProposer, build_block_head
from draftsmith.models.checks import TargetShape
from draftsmith.models.dflash import DFlashConfig, DFlashHead
from draftsmith.models.dspark import DSparkHead
from draftsmith.models.formats import read_head_folder, write_speculators
from draftsmith.protocol.drafting import DraftSampler
from draftsmith.protocol.proposer import DecodeState
from draftsmith.protocol.sampling import Sampling

from conftest import VOCAB, perturbed
from test_parallel import setup  # noqa: F401  (the tiny saved target, chats and recipe)

MASK, BLOCK, DRAFT_VOCAB, RANK = 7, 4, 160, 16
KINDS = pytest.mark.parametrize("cls", [DFlashHead, DSparkHead], ids=["dflash", "dspark"])

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch on one thread per module


def block_head(cls, target, aux=(3, 0, 2), draft_vocab=DRAFT_VOCAB, seed=0):
    """A perturbed head with unsorted tapped layers; dspark's Markov bias scaled up so it moves the argmax."""
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
    extra = {"markov_rank": RANK, "confidence_head": True} if cls is DSparkHead else {}
    head = perturbed(build_block_head(cls, target.model, list(aux), ids, MASK, 2, BLOCK, **extra), seed)
    if cls is DSparkHead:
        with torch.no_grad():
            head.markov_head.markov_w1.weight.mul_(100)
    return head.eval()


def drafts(head, target, tokens):
    """BlockProposer's draft logits [anchors, drafts, V] (and dspark's predicted acceptances) at every anchor of
    `tokens`, after observing the positions before it; each draft forced to the sequence's next token, so
    the Markov bias reads the same previous tokens on both sides of a comparison."""
    proposer = BlockProposer(head, target.model)
    c = head.config
    out = target.forward(tokens, target.new_cache(), hidden_layers=tuple(c.aux_layers))
    seen, forced = [], []

    class Forced(DraftSampler):
        def __call__(self, logits):
            seen.append(logits.float())
            return (forced.pop(0) if forced else int(logits.argmax())), None

    logits, accept = [], []
    for a in range(1, len(tokens) - c.block_size):
        proposer.reset()
        proposer.observe(DecodeState(tokens[: a + 1], a, [h[:a] for h in out.hidden], 0))
        seen.clear()
        forced[:] = tokens[a + 1: a + 1 + c.drafts]
        draft = proposer.propose(DecodeState(tokens[: a + 1], a, [], a), c.drafts, Forced(Sampling()))
        logits.append(torch.stack(seen))
        accept.append(draft.accept)
    return torch.stack(logits), accept


def sequences(n=2, length=20):
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (length,), generator=g).tolist() for _ in range(n)]
    seqs[0][5] = MASK           # the mask id as a real token
    return seqs


def assert_same_drafts(a, b, target, rtol=1e-6):
    """The same draft logits and acceptances within rtol x the largest logit (0: bit for bit), the same argmax."""
    for tokens in sequences():
        (la, pa), (lb, pb) = drafts(a, target, tokens), drafts(b, target, tokens)
        finite = torch.isfinite(la)
        assert torch.equal(finite, torch.isfinite(lb))            # the same draft vocabulary
        assert (la[finite] - lb[finite]).abs().max() <= rtol * la[finite].abs().max()
        assert torch.equal(la.argmax(-1), lb.argmax(-1))
        if pa[0] is not None:
            assert (torch.tensor(pa) - torch.tensor(pb)).abs().max() <= rtol


def speculators_block_tensors(c, taps: int, full_vocab: bool = False) -> dict[str, list[int]]:
    """The tensors docs/formats.md lists for a speculators dflash / dspark checkpoint (speculators 0.9.0's
    DFlashDraftModel / DSparkDraftModel state dict less `_keys_to_ignore_on_save`: embed_tokens,
    verifier_lm_head, verifier_norm; d2t / t2d only with a reduced draft vocabulary)."""
    h, inter, hd = c.hidden_size, c.intermediate_size, c.head_dim
    layer = {
        "input_layernorm.weight": [h], "post_attention_layernorm.weight": [h],
        "self_attn.q_proj.weight": [c.num_attention_heads * hd, h], "self_attn.k_proj.weight": [c.num_key_value_heads * hd, h],
        "self_attn.v_proj.weight": [c.num_key_value_heads * hd, h], "self_attn.o_proj.weight": [h, c.num_attention_heads * hd],
        "self_attn.q_norm.weight": [hd], "self_attn.k_norm.weight": [hd],
        "mlp.gate_proj.weight": [inter, h], "mlp.up_proj.weight": [inter, h], "mlp.down_proj.weight": [h, inter],
    }
    names = {"fc.weight": [h, taps * h], "hidden_norm.weight": [h], "norm.weight": [h],
             "lm_head.weight": [c.draft_vocab_size, h],
             **{f"layers.{i}.{k}": v for i in range(c.num_layers) for k, v in layer.items()}}
    if not full_vocab:
        names.update({"d2t": [c.draft_vocab_size], "t2d": [c.vocab_size]})
    if getattr(c, "markov_rank", 0):
        names.update({"markov_head.markov_w1.weight": [c.vocab_size, c.markov_rank],
                      "markov_head.markov_w2.weight": [c.draft_vocab_size, c.markov_rank]})
    if getattr(c, "confidence_head", False):
        width = h + (c.markov_rank if c.confidence_with_markov else 0)
        names.update({"confidence_head.proj.weight": [1, width], "confidence_head.proj.bias": [1]})
    return names


@KINDS
def test_speculators_export_matches_the_format_and_reads_back(target4, cls, tmp_path):
    head = block_head(cls, target4)
    write_speculators(head, tmp_path, "org/verifier", ["LlamaForCausalLM"], None)   # no embedding needed
    c = head.config
    spark = cls is DSparkHead
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items()} == speculators_block_tensors(c, 3)
    assert torch.equal(weights["lm_head.weight"], head.lm_head.weight)      # the target's rows, as trained
    h = c.hidden_size      # fc's blocks follow the taps into layer order: [3, 0, 2] -> [0, 2, 3]
    assert torch.equal(weights["fc.weight"][:, :h], head.fc.weight[:, h:2 * h])
    assert torch.equal(weights["fc.weight"][:, 2 * h:], head.fc.weight[:, :h])
    raw = json.loads((tmp_path / "config.json").read_text())
    layer = raw.pop("transformer_layer_config")
    assert layer == {
        "model_type": "qwen3", "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}, "max_position_embeddings": 32768,
        "vocab_size": VOCAB, "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
        "sliding_window": None, "layer_types": ["full_attention"] * 2, "tie_word_embeddings": False}
    drafts_per_forward = BLOCK if spark else BLOCK - 1
    expected = {
        "speculators_model_type": "dspark" if spark else "dflash",
        "architectures": ["DSparkSpeculator" if spark else "DFlashSpeculator"],
        "draft_vocab_size": DRAFT_VOCAB, "block_size": BLOCK, "target_hidden_size": 64,
        "aux_hidden_state_layer_ids": [1, 3, 4],        # draftsmith's output ids [0, 2, 3] + 1
        "mask_token_id": MASK, "sliding_window_non_causal": True, "sample_from_anchor": spark,
        "speculators_config": {"algorithm": "dspark" if spark else "dflash",
                               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": drafts_per_forward}],
                               "default_proposal_method": "greedy",
                               "verifier": {"name_or_path": "org/verifier", "architectures": ["LlamaForCausalLM"]}},
        "speculators_version": "0.9.0", "torch_dtype": "float32",
    }
    if spark:
        expected.update(markov_rank=RANK, markov_head_type="vanilla", enable_confidence_head=True,
                        confidence_head_with_markov=True)
    assert raw == expected

    loaded = read_head_folder(tmp_path, TargetShape.of(target4.model))
    assert type(loaded) is cls and loaded.config.aux_layers == [0, 2, 3]
    assert (loaded.config.block_size, loaded.config.mask_token_id, loaded.config.sample_from_anchor) == (BLOCK, MASK, spark)
    assert torch.equal(loaded.draft_ids, head.draft_ids)
    assert_same_drafts(head, loaded, target4)       # fc's columns permuted: the sums run in another order
    in_order = block_head(cls, target4, aux=(0, 2, 3))
    write_speculators(in_order, tmp_path / "in-order", "org/verifier", ["LlamaForCausalLM"], None)
    assert_same_drafts(in_order, read_head_folder(tmp_path / "in-order", TargetShape.of(target4.model)), target4, rtol=0)
    via_cli = load_drafter(str(tmp_path), target4)
    assert isinstance(via_cli, BlockProposer) and type(via_cli.head) is cls


@KINDS
def test_a_twice_tapped_layer_is_merged_and_a_full_vocabulary_has_no_maps(target4, cls, tmp_path):
    head = block_head(cls, target4, aux=(1, 3, 1), draft_vocab=VOCAB)
    write_speculators(head, tmp_path, "v", ["LlamaForCausalLM"], None)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items()} == speculators_block_tensors(head.config, 2, full_vocab=True)
    h = head.config.hidden_size
    assert torch.equal(weights["fc.weight"][:, :h], head.fc.weight[:, :h] + head.fc.weight[:, 2 * h:])
    assert json.loads((tmp_path / "config.json").read_text())["aux_hidden_state_layer_ids"] == [2, 4]
    loaded = read_head_folder(tmp_path, TargetShape.of(target4.model))
    assert loaded.config.aux_layers == [1, 3] and torch.equal(loaded.draft_ids, torch.arange(VOCAB))
    assert_same_drafts(head, loaded, target4)      # fc's merged blocks sum in another order


def _edited(src, dst, config=None, drop=()):
    dst.mkdir()
    raw = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(raw) if config else raw))
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k not in drop}, str(dst / "model.safetensors"))
    return dst


def _set(key, value, layer=False):
    def edit(raw):
        (raw["transformer_layer_config"] if layer else raw)[key] = value
        return raw
    return edit


def _without(key):
    return lambda raw: {k: v for k, v in raw.items() if k != key}


@KINDS
def test_bad_configs_are_refused_by_name(target4, cls, tmp_path):
    head = block_head(cls, target4)
    good = tmp_path / "good"
    write_speculators(head, good, "v", ["LlamaForCausalLM"], None)
    cases = [
        ("block_size", _set("block_size", 0), ()),
        ("mask_token_id", _set("mask_token_id", VOCAB), ()),
        ("mask_token_id", _set("mask_token_id", None), ()),
        ("draft_vocab_size", _without("draft_vocab_size"), ()),
        ("aux_hidden_state_layer_ids", _set("aux_hidden_state_layer_ids", [0, 2, 3]), ()),   # 0: the embedding
        ("aux_hidden_state_layer_ids", _set("aux_hidden_state_layer_ids", [1, 1, 3]), ()),
        ("layers this target does not have", _set("aux_hidden_state_layer_ids", [1, 3, 5]), ()),
        ("target_hidden_size", _set("target_hidden_size", 128), ()),
        ("layer_types", _set("layer_types", ["sliding_attention", "full_attention"], layer=True), ()),
        ("attention_bias", _set("attention_bias", True, layer=True), ()),
        ("do not match its config.json", _set("num_hidden_layers", 3, layer=True), ()),   # weights hold 2 layers
        ("draft-vocabulary maps", None, ("d2t",)),
        ("no lm_head.weight", None, ("lm_head.weight",)),
    ]
    if cls is DSparkHead:
        cases += [("markov_head_type", _set("markov_head_type", "gated"), ()),
                  ("markov_rank", _set("markov_rank", 0), ())]     # its confidence head reads the Markov embedding
    for i, (match, edit, drop) in enumerate(cases):
        folder = _edited(good, tmp_path / f"bad{i}", edit, drop)
        with pytest.raises(DraftsmithError, match=match):
            read_head_folder(folder, TargetShape.of(target4.model))
    # a head narrower than its target: speculators' fc is [H, taps x H], no layout for it
    c = replace(DFlashConfig.from_target(target4.model.config, num_layers=1, block_size=4, draft_vocab_size=VOCAB,
                                         aux_layers=[0, 1], target_hidden_size=64, mask_token_id=MASK), hidden_size=32)
    with pytest.raises(DraftsmithError, match="target_hidden_size 64"):
        write_speculators(DFlashHead(c), tmp_path / "narrow", "v", ["LlamaForCausalLM"], None)


# ------------------------------------------------------------------------------------ end to end

def test_export_formats_of_block_runs(setup, tmp_path, capsys):  # noqa: F811
    """A tiny dflash and dspark run (its 2-layer target taps layers [0, 1, 1]: one merged): `--format
    speculators` writes the type and loads back through load_drafter with the drafts of the `hf` export;
    `--format sglang` is refused, naming the alternatives."""
    from draftsmith.cli import main
    from draftsmith.eval.decoder import speculative_generate
    from draftsmith.models.target import load_target

    common = ["train", str(setup / "recipe.yaml"), f"run.out_dir={tmp_path}", "drafter.block_size=4",
              "drafter.max_anchors=4", "drafter.num_layers=1", "drafter.draft_vocab_size=200",
              "train.max_steps=2", "checkpoint.every=2", "eval.every=2"]
    runs = {"dflash": ["drafter.kind=dflash"],
            "dspark": ["drafter.kind=dspark", "drafter.markov_rank=8", "drafter.confidence_head=true"]}
    target = load_target(str(setup / "target"), "fp32", device="cpu")
    for kind, extra in runs.items():
        assert main(common + extra + [f"run.name={kind}"]) == 0
        run = tmp_path / kind
        spec, hf = tmp_path / f"{kind}-spec", tmp_path / f"{kind}-hf"
        assert main(["export", str(run), "--format", "speculators", "--out", str(spec)]) == 0
        assert main(["export", str(run), "--format", "hf", "--out", str(hf)]) == 0
        raw = json.loads((spec / "config.json").read_text())
        assert raw["speculators_model_type"] == kind and raw["aux_hidden_state_layer_ids"] == [1, 2]
        assert raw["speculators_config"]["verifier"]["name_or_path"] == str(setup / "target")
        assert json.loads((spec / "draftsmith.json").read_text())["format"] == "speculators"
        assert json.loads((hf / "config.json").read_text())["draftsmith_kind"] == kind
        capsys.readouterr()
        assert main(["export", str(run), "--format", "sglang", "--out", str(tmp_path / f"{kind}-sg")]) == 2
        assert "no SGLang layout for the block drafters" in capsys.readouterr().err
        assert not (tmp_path / f"{kind}-sg").exists()
        a, b = load_drafter(str(spec), target), load_drafter(str(hf), target)
        assert isinstance(a, BlockProposer) and type(a.head) is type(b.head)
        prompt = target.tokenizer.encode("the cat runs fast")
        x = speculative_generate(target, a, prompt, k=3, max_new_tokens=12)
        y = speculative_generate(target, b, prompt, k=3, max_new_tokens=12)
        assert (x.tokens, x.accepted) == (y.tokens, y.accepted)
