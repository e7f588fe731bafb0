"""Peer check: does vLLM's `speculators` read a draftsmith `--format speculators` eagle3 export as the
head draftsmith trained? Loads the export with speculators' own Eagle3 model class and compares its
first-step draft logits with draftsmith's on the same inputs (a tiny random Llama target, CPU fp32).

speculators pins other transformers/torch versions than draftsmith, so it lives in its own venv
(DESIGN.md, "Peer libraries"); this script runs twice: once here (build, export, compare) and once
under that venv with --peer (load with speculators, write its logits). Usage:

  python bench/speculators_peer.py --spec-python /tmp/specvenv/bin/python [--out /tmp/peer]

Prints one JSON line: tensor names speculators declares vs the export's, embedding equality, the
largest logit difference and the share of positions whose argmax agrees, for the export as written.
(It once also loaded the same export without embed_tokens.weight, what draftsmith wrote before
issue 9; that row's recorded 100% did not reproduce, so it is gone: bench/results/README.md.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HIDDEN, VOCAB, LAYERS, DRAFT_VOCAB, T = 64, 256, 8, 160, 24
EXPORTS = ("export",)   # the folders compared: the rows of result.json


def peer(folder: Path) -> None:
    """Under the speculators venv: load each export with Eagle3DraftModel and record its logits."""
    import torch
    from safetensors.torch import load_file, save_file
    from speculators.models.eagle3 import Eagle3SpeculatorConfig
    from speculators.models.eagle3.core import Eagle3DraftModel

    inputs = load_file(str(folder / "inputs.safetensors"))
    result = {}
    for name in EXPORTS:
        config = Eagle3SpeculatorConfig.from_pretrained(folder / name)
        config.transformer_layer_config._attn_implementation = "eager"   # flex attention is for GPUs
        model = Eagle3DraftModel.from_pretrained(folder / name, config=config).eval()
        captured = {}
        model.lm_head.register_forward_hook(lambda m, a, out: captured.setdefault("logits", out))
        with torch.no_grad():
            model(hidden_states=inputs["hidden"], input_ids=inputs["ids"],
                  document_ids=torch.zeros_like(inputs["ids"]), ttt_steps=1)
        declared = {k: list(v.shape) for k, v in model.state_dict().items()
                    if k not in model._keys_to_ignore_on_save}
        save_file({"logits": captured["logits"][0].float().contiguous(),
                   "embed": model.embed_tokens.weight.detach().float().contiguous()},
                  str(folder / f"{name}-peer.safetensors"))
        result[name] = {"declared": declared}
    (folder / "peer.json").write_text(json.dumps(result))


def tiny_target_and_head(folder: Path):
    """A tiny random Llama target saved as the local verifier folder `folder/target`, and an eagle3
    head on it whose tapped layers are unsorted on purpose (the export must put them in layer order,
    with fc's blocks permuted to match). Seeded: the same target and head on every call."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftsmith.models.eagle3 import build_eagle3

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    target = LlamaForCausalLM(config).eval()
    target.save_pretrained(folder / "target")
    return target, build_eagle3(target, [5, 1, 3], torch.randperm(VOCAB)[:DRAFT_VOCAB].sort().values)


def build_and_export(folder: Path) -> None:
    """Here: a tiny target saved as a local verifier folder, a perturbed eagle3 head, its export."""
    import torch
    from safetensors.torch import save_file

    from draftsmith.models.formats import target_embedding, write_speculators

    target, head = tiny_target_and_head(folder)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    head.eval()
    for name in EXPORTS:
        (folder / name).mkdir(parents=True, exist_ok=True)
        write_speculators(head, folder / name, str(folder / "target"), ["LlamaForCausalLM"],
                          target_embedding(str(folder / "target")))

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, T), generator=g)
    with torch.no_grad():
        hs = target(ids, output_hidden_states=True).hidden_states
        layers = sorted(head.config.aux_layers)                 # what a serving engine concatenates
        hidden = torch.cat([hs[i + 1] for i in layers], dim=-1)   # [1, T, 3H], layer order
        mine = [hs[i + 1] for i in head.config.aux_layers]        # draftsmith's own order
        embeds = target.get_input_embeddings()(ids)
        logits = head.logits(head(embeds, head.fuse(mine), torch.arange(T)[None]))[0]
    save_file({"ids": ids, "hidden": hidden.contiguous(), "logits": logits.contiguous(),
               "embed": target.get_input_embeddings().weight.detach().contiguous()},
              str(folder / "inputs.safetensors"))


def compare(folder: Path) -> dict:
    from safetensors.torch import load_file

    inputs = load_file(str(folder / "inputs.safetensors"))
    peer_info = json.loads((folder / "peer.json").read_text())
    report = {}
    for name in EXPORTS:
        theirs = load_file(str(folder / f"{name}-peer.safetensors"))
        written = set(load_file(str(folder / name / "model.safetensors")))
        declared = peer_info[name]["declared"]
        diff = (theirs["logits"] - inputs["logits"]).abs().max().item()
        agree = (theirs["logits"].argmax(-1) == inputs["logits"].argmax(-1)).float().mean().item()
        report[name] = {
            "declared_not_written": sorted(set(declared) - written),
            "written_not_declared": sorted(written - set(declared)),
            "embedding_equal": bool((theirs["embed"] == inputs["embed"]).all()),
            "embedding_all_zero": bool((theirs["embed"] == 0).all()),
            "max_abs_logit_diff": diff,
            "argmax_agreement": agree,
        }
    report["declared"] = peer_info["export"]["declared"]
    return report


def real_export(folder: Path, export: Path, target_spec: str, prompts: int, new_tokens: int):
    """A trained `export` copied with its verifier pointed at the target's local folder; the target's greedy answers."""
    from draftsmith.eval.benchmarks import load_bench
    from draftsmith.eval.decoder import autoregressive_generate
    from draftsmith.eval.harness import encode_turn
    from draftsmith.models.target import load_target, resolve_model_folder

    shutil.copytree(export, folder / "export", dirs_exist_ok=True)
    raw = json.loads((folder / "export" / "config.json").read_text())
    raw["speculators_config"]["verifier"]["name_or_path"] = str(resolve_model_folder(target_spec)[0])
    (folder / "export" / "config.json").write_text(json.dumps(raw, indent=2))
    target = load_target(target_spec, "fp32", device="cpu")
    sequences = []
    for item in load_bench("mt_bench", prompts, 1):
        prompt = encode_turn(target, item.turns[:1], [])
        sequences.append(prompt + autoregressive_generate(target, prompt, max_new_tokens=new_tokens).tokens)
    return target, sequences


MARKER = ".draftsmith-peer-check"
"""Written into every working folder a peer check makes: only such a folder is ever emptied."""


def fresh_workdir(folder: Path) -> None:
    """An empty working folder at `folder`: created, or emptied when a peer check made it (it holds MARKER);
    a non-empty folder the check did not make is refused, never deleted."""
    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise SystemExit(f"--out {folder} exists, is not empty and was not made by a peer check: "
                         "name a new or empty folder (it is replaced on every run)")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("a draftsmith peer check's working folder; replaced on every run\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec-python", default="/tmp/specvenv/bin/python", help="python of the speculators venv")
    parser.add_argument("--out", default="/tmp/speculators-peer", help="working folder")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.out)
    if args.peer:
        peer(folder)
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    build_and_export(folder)
    subprocess.run([args.spec_python, __file__, "--peer", "--out", str(folder)], check=True)
    print(json.dumps(compare(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
