"""Peer check: does vLLM's `speculators` 0.9.0 read a draftsmith `--format speculators` block-drafter export
(`dflash` / `dspark` types) as the head draftsmith drafts with? speculators' own classes load the export
(SpeculatorModelConfig / SpeculatorModel resolve DFlashSpeculatorConfig / DFlashDraftModel and the DSpark
ones) and run their own training forward — anchored blocks [x_a, mask x (B-1)] under their own attention
mask, the Markov bias and the confidence head for dspark — on the target's hidden states at chosen anchors;
each block is compared with the draft logits draftsmith's BlockProposer computes for the same anchor after
observing positions < a (the anchor = the newest token), drafts forced to the sequence's own tokens so the
Markov bias reads the same previous tokens as speculators' teacher-forced one.

speculators pins other versions than draftsmith, so it lives in its own venv (DESIGN.md, "Peer
libraries"); this script runs twice: here (build or read the export, target features, draftsmith's
drafts, compare) and under that venv with --peer (load with speculators, write its logits). Usage:

  python bench/speculators_block_peer.py --spec-python /work/spec-venv/bin/python [--kind dflash|dspark|both]
  python bench/speculators_block_peer.py --export runs/dflash-quick/speculators --target smollm2-135m-instruct

Without --export: a tiny random Llama target (saved as the local verifier folder), a perturbed head of each
kind with unsorted tapped layers (one of them the last layer: speculators id N). With --export: that folder,
its verifier pointed at the target's local folder (no hub access), features of the target's own greedy
answers to MT-bench prompts. Prints one JSON line per kind: tensor names speculators declares vs the
export's, the classes it chose, embedding / LM head read back, the anchors and drafts compared, the argmax
agreement (overall and per draft position), the largest logit difference and, for dspark, the largest
difference of the predicted acceptance (sigmoid of the confidence logit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from speculators_peer import fresh_workdir, real_export   # a trained export's verifier pointed at the local target

HIDDEN, VOCAB, LAYERS, DRAFT_VOCAB, MASK, BLOCK, T = 64, 256, 8, 160, 7, 5, 40
AUX = [5, 1, 3, 7]     # unsorted on purpose; 7 = the last layer's output (speculators id 8 = N)


def peer(folder: Path) -> None:
    """Under the speculators venv: load the export and record the block logits of every anchor."""
    import torch
    from safetensors.torch import load_file, save_file
    from speculators import SpeculatorModel, SpeculatorModelConfig
    from speculators.models.dflash import core as dflash_core
    from speculators.models.dspark import core as dspark_core

    inputs = load_file(str(folder / "inputs.safetensors"))
    config = SpeculatorModelConfig.from_pretrained(folder / "export")
    config.transformer_layer_config._attn_implementation = "eager"   # flex attention is for GPUs
    model = SpeculatorModel.from_pretrained(folder / "export", config=config).eval()
    current: dict = {}
    # speculators draws its anchors at random (select_anchors): these are the ones draftsmith drafted at
    dflash_core.select_anchors = lambda mask, n, block: (current["anchors"], torch.ones(n, dtype=torch.bool))
    # the loss is not compared: record what it is given (the block logits, Markov bias added; the confidence logits)
    dflash_core.compute_metrics = lambda logits, *a, **kw: current.update(logits=logits) or (torch.zeros(()), {})
    dspark_core.compute_metrics = lambda logits, targets, conf, *a, **kw: current.update(
        logits=logits, conf=conf) or (torch.zeros(()), {})
    b = config.block_size
    out = {}
    with torch.no_grad():
        for i in range(int(inputs["count"])):
            anchors = inputs[f"anchors{i}"]
            current.clear()
            current["anchors"] = anchors
            ids = inputs[f"ids{i}"]
            model(hidden_states=inputs[f"hidden{i}"], input_ids=ids, loss_mask=torch.ones_like(ids),
                  verifier_last_hidden_states=inputs[f"last{i}"], document_ids=torch.zeros_like(ids),
                  max_anchors=len(anchors))
            out[f"logits{i}"] = current["logits"].float().reshape(len(anchors), b, -1).contiguous()
            if current.get("conf") is not None:
                out[f"conf{i}"] = current["conf"].float().reshape(len(anchors), b).contiguous()
    declared = {k: list(v.shape) for k, v in model.state_dict().items() if k not in model._keys_to_ignore_on_save}
    out.update(embed=model.embed_tokens.weight.detach().float().contiguous(),
               lm_head=model.lm_head.weight.detach().float().contiguous())
    save_file(out, str(folder / "peer.safetensors"))
    (folder / "peer.json").write_text(json.dumps({
        "declared": declared, "config_class": type(config).__name__, "model_class": type(model).__name__,
        "mask_token_id": model.mask_token_id, "block_size": b, "sample_from_anchor": config.sample_from_anchor,
        "speculative_tokens": config.speculators_config.proposal_methods[0].speculative_tokens,
        "aux_hidden_state_layer_ids": list(model.target_layer_ids)}))


def tiny_target(folder: Path):
    """A tiny random Llama target saved as the local verifier folder `folder` (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    if not (folder / "config.json").exists():
        model.save_pretrained(folder)
    return model


def tiny_export(folder: Path, kind: str):
    """A perturbed head of `kind` on the tiny target, its export, random sequences (one holds the mask id)."""
    import torch

    from draftsmith.models.block_drafter import build_block_head
    from draftsmith.models.dflash import DFlashHead
    from draftsmith.models.dspark import DSparkHead
    from draftsmith.models.formats import write_speculators
    from draftsmith.models.target import Target

    model = tiny_target(folder.parent / "target")
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:DRAFT_VOCAB].sort().values
    cls, extra = (DSparkHead, {"markov_rank": 16, "confidence_head": True}) if kind == "dspark" else (DFlashHead, {})
    head = build_block_head(cls, model, AUX, ids, MASK, 2, BLOCK, **extra)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if kind == "dspark":     # a Markov bias large enough to move the argmax
            head.markov_head.markov_w1.weight.mul_(10)
    write_speculators(head.eval(), folder / "export", str(folder.parent / "target"), ["LlamaForCausalLM"], None)
    g = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, VOCAB, (T,), generator=g).tolist() for _ in range(4)]
    sequences[0][12] = MASK        # the mask id as a real token: both sides embed it as the mask
    return Target(model, tokenizer=None, name="tiny"), sequences


def draftsmith_side(folder: Path, target, sequences) -> None:
    """The peer's inputs (taps in layer order, the anchors) and, per sequence, draftsmith's draft logits
    [anchors, drafts, Vd] and predicted acceptances [anchors, drafts] (dspark) at every anchor."""
    import torch
    from safetensors.torch import save_file

    from draftsmith.models.checks import TargetShape
    from draftsmith.models.formats import proposer_for, read_head_folder
    from draftsmith.protocol.drafting import DraftSampler
    from draftsmith.protocol.proposer import DecodeState
    from draftsmith.protocol.sampling import Sampling

    head = read_head_folder(folder / "export", TargetShape.of(target.model))
    proposer = proposer_for(head, target.model)
    c = head.config
    d = c.drafts
    seen: list[torch.Tensor] = []
    forced: list[int] = []

    class Forced(DraftSampler):     # keeps every draft's logits; drafts the sequence's own next token
        def __call__(self, logits):
            seen.append(logits.float())
            return (forced.pop(0) if forced else int(logits.argmax())), None

    sampler = Forced(Sampling())
    inputs, mine = {"count": torch.tensor(len(sequences))}, {}
    for i, tokens in enumerate(sequences):
        out = target.forward(tokens, target.new_cache(), hidden_layers=tuple(c.aux_layers) + (-1,))
        anchors = list(range(1, len(tokens) - c.block_size))     # every block and its forced tokens inside
        inputs[f"hidden{i}"] = torch.cat(out.hidden[:-1], -1)[None].float().contiguous()
        inputs[f"ids{i}"] = torch.tensor([tokens])
        inputs[f"last{i}"] = out.hidden[-1][None].float().contiguous()
        inputs[f"anchors{i}"] = torch.tensor(anchors)
        logits, accept = [], []
        for a in anchors:
            proposer.reset()
            proposer.observe(DecodeState(tokens=tokens[: a + 1], committed=a, hidden=[h[:a] for h in out.hidden[:-1]],
                                         hidden_start=0))
            seen.clear()
            forced[:] = tokens[a + 1: a + 1 + d]
            draft = proposer.propose(DecodeState(tokens=tokens[: a + 1], committed=a, hidden=[], hidden_start=a), d,
                                     sampler)
            logits.append(torch.stack(seen)[:, head.draft_ids])                       # [d, Vd]
            if draft.accept is not None:
                accept.append(torch.tensor(draft.accept))
        mine[f"logits{i}"] = torch.stack(logits).contiguous()                          # [anchors, d, Vd]
        if accept:
            mine[f"accept{i}"] = torch.stack(accept).float().contiguous()               # [anchors, d]
    mine["draft_ids"] = head.draft_ids
    save_file(inputs, str(folder / "inputs.safetensors"))
    save_file(mine, str(folder / "mine.safetensors"))


def compare(folder: Path, target_folder: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from draftsmith.models.formats import target_embedding

    mine, theirs = load_file(str(folder / "mine.safetensors")), load_file(str(folder / "peer.safetensors"))
    info = json.loads((folder / "peer.json").read_text())
    written = load_file(str(folder / "export" / "model.safetensors"))
    offset = 0 if info["sample_from_anchor"] else 1
    agree, total, diff, conf_diff, by_pos, anchors = 0, 0, 0.0, None, {}, 0
    for i in range(int(load_file(str(folder / "inputs.safetensors"))["count"])):
        ours = mine[f"logits{i}"]                                                     # [A, d, Vd]
        peer_logits = theirs[f"logits{i}"][:, offset: offset + ours.shape[1]]         # draft j = slot j + offset
        anchors += ours.shape[0]
        hit = ours.argmax(-1) == peer_logits.argmax(-1)                               # [A, d]
        agree, total = agree + int(hit.sum()), total + hit.numel()
        diff = max(diff, float((ours - peer_logits).abs().max()))
        for j in range(hit.shape[1]):
            n, h = by_pos.get(j, (0, 0))
            by_pos[j] = (n + hit.shape[0], h + int(hit[:, j].sum()))
        if f"conf{i}" in theirs:
            theirs_p = torch.sigmoid(theirs[f"conf{i}"][:, offset: offset + ours.shape[1]])
            conf_diff = max(conf_diff or 0.0, float((mine[f"accept{i}"] - theirs_p).abs().max()))
    declared = info.pop("declared")
    embed = target_embedding(target_folder).float()
    result = {
        **info,
        "declared_not_written": sorted(set(declared) - set(written)),
        "written_not_declared": sorted(set(written) - set(declared)),
        "shapes_equal": all(list(written[k].shape) == v for k, v in declared.items() if k in written),
        "embedding_is_targets": bool(torch.equal(theirs["embed"], embed)),
        "lm_head_equal": bool(torch.equal(theirs["lm_head"], written["lm_head.weight"].float())),
        "anchors": anchors,
        "drafts_compared": total,
        "argmax_agreement": agree / max(1, total),
        "argmax_agreement_by_draft": {j: h / n for j, (n, h) in sorted(by_pos.items())},
        "max_abs_logit_diff": diff,
    }
    if conf_diff is not None:
        result["max_abs_acceptance_diff"] = conf_diff
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec-python", default="/work/spec-venv/bin/python", help="python of the speculators venv")
    parser.add_argument("--out", default="/tmp/speculators-block-peer", help="working folder (replaced)")
    parser.add_argument("--kind", choices=("dflash", "dspark", "both"), default="both", help="tiny heads to check")
    parser.add_argument("--export", help="a draftsmith --format speculators dflash / dspark export (default: tiny ones)")
    parser.add_argument("--target", default="smollm2-135m-instruct", help="its target, with --export")
    parser.add_argument("--prompts", type=int, default=4, help="MT-bench prompts answered by the target, with --export")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.out)
    if args.peer:
        peer(folder)
        return 0
    import torch

    torch.set_num_threads(1)
    fresh_workdir(folder)
    if args.export:
        from draftsmith.models.target import resolve_model_folder

        runs = [(folder / "export-check", lambda f: real_export(f, Path(args.export), args.target, args.prompts,
                                                                args.new_tokens), str(resolve_model_folder(args.target)[0]))]
    else:
        kinds = ("dflash", "dspark") if args.kind == "both" else (args.kind,)
        runs = [(folder / kind, lambda f, kind=kind: tiny_export(f, kind), str(folder / "target")) for kind in kinds]
    for work, build, target_folder in runs:
        work.mkdir(parents=True)
        target, sequences = build(work)
        draftsmith_side(work, target, sequences)
        subprocess.run([args.spec_python, __file__, "--peer", "--out", str(work)], check=True)
        print(json.dumps(compare(work, target_folder)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
