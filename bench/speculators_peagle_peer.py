"""Peer check: does vLLM's `speculators` 0.9.0 read a draftsmith `--format speculators` P-EAGLE export
(`peagle` type) as the head draftsmith drafts with? speculators' own classes load the export
(SpeculatorModelConfig / SpeculatorModel resolve the registered `peagle` types) and run their P-EAGLE
forward — COD-sampled mask elements under their own attention mask — on the target's hidden states;
every element (anchor row a, depth d) it scores is compared with the draft logits draftsmith's
PEagleProposer computes when it drafts d masks after committing rows 0..a (one forward, as in decoding).

speculators pins other versions than draftsmith, so it lives in its own venv (DESIGN.md, "Peer
libraries"); this script runs twice: here (build or read the export, target features, draftsmith's
drafts, compare) and under that venv with --peer (load with speculators, write its logits). Usage:

  python bench/speculators_peagle_peer.py --spec-python /tmp/specvenv/bin/python [--out /tmp/peagle-peer]
  python bench/speculators_peagle_peer.py --export runs/peagle-smoke/speculators --target smollm2-135m-instruct

Without --export: a tiny random Llama target (saved as the local verifier folder) and a perturbed
P-EAGLE head with unsorted tapped layers. With --export: that folder, its verifier pointed at the
target's local folder (no hub access), features of the target's own greedy answers to MT-bench prompts.
Prints one JSON line: tensor names speculators declares vs the export's, the classes it chose, mask
tensors read back, the positions compared, the argmax agreement (overall and per depth) and the
largest logit difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from speculators_peer import VOCAB, fresh_workdir, real_export, tiny_target_and_head   # the eagle3 peer check's

K, MASK = 4, 7


def peer(folder: Path) -> None:
    """Under the speculators venv: load the export and record the logits of every element it samples."""
    import torch
    from safetensors.torch import load_file, save_file
    from speculators import SpeculatorModel, SpeculatorModelConfig
    from speculators.losses.eager import kl_div_loss
    from speculators.models.peagle import core

    inputs = load_file(str(folder / "inputs.safetensors"))
    config = SpeculatorModelConfig.from_pretrained(folder / "export")
    config.transformer_layer_config._attn_implementation = "eager"   # flex attention is for GPUs
    model = SpeculatorModel.from_pretrained(folder / "export", config=config).eval()
    sampled, logits = [], []
    draw = core.generate_cod_sample_indices
    core.generate_cod_sample_indices = lambda *a, **kw: sampled.append(draw(*a, **kw)) or sampled[-1]
    model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[0].float()))
    k = config.speculators_config.proposal_methods[0].speculative_tokens
    torch.manual_seed(0)
    out = {}
    with torch.no_grad():
        for i in range(int(inputs["count"])):
            hidden, ids = inputs[f"hidden{i}"], inputs[f"ids{i}"]
            model(hidden_states=hidden, input_ids=ids, document_ids=torch.zeros_like(ids),
                  loss_mask=torch.ones_like(ids), verifier_last_hidden_states=inputs[f"last{i}"], num_depths=k,
                  loss_config={"kl_div": (kl_div_loss, 1.0)})   # the loss is not compared: its eager form
            anchor, depth = sampled[-1]
            out.update({f"logits{i}": logits[-1].contiguous(), f"anchor{i}": anchor, f"depth{i}": depth})
    declared = {k: list(v.shape) for k, v in model.state_dict().items() if k not in model._keys_to_ignore_on_save}
    out.update(mask_hidden=model.mask_hidden.detach().float().contiguous(),
               embed=model.embed_tokens.weight.detach().float().contiguous())
    save_file(out, str(folder / "peer.safetensors"))
    (folder / "peer.json").write_text(json.dumps({
        "declared": declared, "config_class": type(config).__name__, "model_class": type(model).__name__,
        "mask_token_id": model.mask_token_id, "num_depths": k}))


def tiny_export(folder: Path):
    """A tiny target saved as a local verifier folder, a perturbed P-EAGLE head, its export."""
    import torch

    from draftsmith.models.layers import target_parts
    from draftsmith.models.formats import target_embedding, write_speculators
    from draftsmith.models.peagle import PEagleHead
    from draftsmith.models.target import Target

    # its tapped layers are unsorted: the export puts them in layer order, mask_hidden's blocks permuted too
    model, head = tiny_target_and_head(folder)
    head = PEagleHead.from_eagle3(head, target_parts(model)[0], K, MASK)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    (folder / "export").mkdir(parents=True, exist_ok=True)
    write_speculators(head.eval(), folder / "export", str(folder / "target"), ["LlamaForCausalLM"],
                      target_embedding(str(folder / "target")))
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, VOCAB, (96,), generator=g).tolist() for _ in range(8)]
    sequences[0][10] = MASK        # the mask id as a real token: both sides embed it as the mask
    return Target(model, tokenizer=None, name="tiny"), sequences


def draftsmith_side(folder: Path, target, sequences) -> None:
    """The peer's inputs (speculators' rows: taps at t beside token t+1, taps in layer order) and, per
    sequence, draftsmith's draft logits [rows, k, V] drafted after each row."""
    import torch
    from safetensors.torch import save_file

    from draftsmith.protocol.proposer import DecodeState
    from draftsmith.protocol.drafting import DraftSampler
    from draftsmith.protocol.sampling import Sampling
    from draftsmith.models.formats import proposer_for, read_head_folder
    from draftsmith.models.checks import TargetShape

    head = read_head_folder(folder / "export", TargetShape.of(target.model))
    proposer = proposer_for(head, target.model)
    layers = sorted(head.config.aux_layers)
    k = head.config.parallel_k
    seen: list[torch.Tensor] = []

    class Recording(DraftSampler):     # greedy drafting that keeps the logits of every depth
        def __call__(self, logits):
            seen.append(logits.float())
            return super().__call__(logits)

    sampler = Recording(Sampling())
    inputs, mine = {"count": torch.tensor(len(sequences))}, {}
    for i, tokens in enumerate(sequences):
        out = target.forward(tokens[:-1], target.new_cache(), hidden_layers=tuple(head.config.aux_layers) + (-1,))
        taps = {layer: h for layer, h in zip(head.config.aux_layers, out.hidden)}
        rows = len(tokens) - 1
        inputs[f"hidden{i}"] = torch.cat([taps[layer] for layer in layers], -1)[None].float().contiguous()
        inputs[f"ids{i}"] = torch.tensor([tokens[1:]])
        inputs[f"last{i}"] = out.hidden[-1][None].float().contiguous()
        logits = []
        for a in range(rows):
            proposer.reset()
            proposer.observe(DecodeState(tokens=tokens[: a + 2], committed=a + 1, hidden=[h[: a + 1] for h in
                                         out.hidden[:3]], hidden_start=0))
            seen.clear()
            proposer.propose(DecodeState(tokens=tokens[: a + 2], committed=a + 1, hidden=[], hidden_start=0),
                             k, sampler)
            logits.append(torch.stack(seen)[:, head.draft_ids])                       # [k, Vd]
        mine[f"logits{i}"] = torch.stack(logits).contiguous()                          # [rows, k, Vd]
    mine["draft_ids"] = head.draft_ids
    save_file(inputs, str(folder / "inputs.safetensors"))
    save_file(mine, str(folder / "mine.safetensors"))


def compare(folder: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    mine, theirs = load_file(str(folder / "mine.safetensors")), load_file(str(folder / "peer.safetensors"))
    info = json.loads((folder / "peer.json").read_text())
    written = load_file(str(folder / "export" / "model.safetensors"))
    agree, total, diff, by_depth, before_first = 0, 0, 0.0, {}, 0
    for i in range(int(load_file(str(folder / "inputs.safetensors"))["count"])):
        a, d, peer_logits = theirs[f"anchor{i}"], theirs[f"depth{i}"], theirs[f"logits{i}"]
        # speculators' COD also samples masks at depth d from position d-1 (anchor -1: no row committed
        # yet), a situation drafting never meets: not compared
        real = a >= 0
        before_first += int((~real).sum())
        a, d, peer_logits = a[real], d[real], peer_logits[real]
        ours = mine[f"logits{i}"][a, d]                                                 # [elements, Vd]
        hit = ours.argmax(-1) == peer_logits.argmax(-1)
        agree, total = agree + int(hit.sum()), total + len(hit)
        diff = max(diff, float((ours - peer_logits).abs().max()))
        for depth in d.unique().tolist():
            n, h = by_depth.get(depth, (0, 0))
            by_depth[depth] = (n + int((d == depth).sum()), h + int(hit[d == depth].sum()))
    declared = info.pop("declared")
    return {
        **info,
        "declared_not_written": sorted(set(declared) - set(written)),
        "written_not_declared": sorted(set(written) - set(declared)),
        "shapes_equal": all(list(written[k].shape) == v for k, v in declared.items() if k in written),
        "mask_hidden_equal": bool(torch.equal(theirs["mask_hidden"], written["mask_hidden"].float())),
        "embedding_equal": bool(torch.equal(theirs["embed"], written["embed_tokens.weight"].float())),
        "positions": total,
        "skipped_anchor_minus_1": before_first,
        "argmax_agreement": agree / max(1, total),
        "argmax_agreement_by_depth": {d: h / n for d, (n, h) in sorted(by_depth.items())},
        "max_abs_logit_diff": diff,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec-python", default="/tmp/specvenv/bin/python", help="python of the speculators venv")
    parser.add_argument("--out", default="/tmp/speculators-peagle-peer", help="working folder (replaced)")
    parser.add_argument("--export", help="a draftsmith --format speculators P-EAGLE export (default: a tiny one)")
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
        target, sequences = real_export(folder, Path(args.export), args.target, args.prompts, args.new_tokens)
    else:
        target, sequences = tiny_export(folder)
    draftsmith_side(folder, target, sequences)
    subprocess.run([args.spec_python, __file__, "--peer", "--out", str(folder)], check=True)
    print(json.dumps(compare(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
