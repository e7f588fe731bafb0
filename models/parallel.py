"""Kind `parallel`: a PARD drafter (An et al. 2504.18583; PARD-2 2605.08632) — a small causal LM of
the target's family that drafts k tokens in ONE forward.

After the committed tokens it reads k-1 copies of a mask token: the output at the last real token
predicts the first draft, the output at mask i predicts draft i+1. The mask token is one embedding
row appended after the target's vocabulary (id V = the target's vocabulary size), recorded in the
config as `draftsmith_mask_token_id` and as `pard_token` (the key vLLM's parallel drafting reads);
the drafter's logits are sliced back to the target's V tokens, so drafts are always target ids.

Training (the mask blocks, conditional drop-token, CAT weighting) lives in models/parallel_train.py.
"""

from __future__ import annotations

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.models.architectures import target_config
from draftsmith.models.lm_rows import LMFeed, forward_rows
from draftsmith.models.prefix import catch_up
from draftsmith.models.small_lm import build_small_lm
from draftsmith.models.target import new_cache, resolve_model_folder, rollback
from draftsmith.protocol.drafting import Draft, TreeShape, grow_draft
from draftsmith.protocol.proposer import DecodeState, Sampler
from draftsmith.protocol.tree import depths


def mask_token_id(model: torch.nn.Module) -> int:
    return int(model.config.draftsmith_mask_token_id)


def target_vocab_size(model: torch.nn.Module) -> int:
    return int(model.config.draftsmith_target_vocab_size)


def add_mask_token(model: torch.nn.Module, target_vocab: int) -> torch.nn.Module:
    """Append the mask token's embedding row (the mean of the token embeddings, so it starts as an
    "average token" rather than noise) and mark the model as a parallel drafter. A model that already
    is one (a warm start) is checked and kept."""
    config = model.config
    if getattr(config, "draftsmith_mask_token_id", None) is not None:
        if target_vocab_size(model) != target_vocab:
            raise DraftsmithError("This parallel drafter was made for another vocabulary",
                                  f"drafter for {target_vocab_size(model)} tokens, target {target_vocab}",
                                  "Start from a drafter that shares the target's tokenizer")
        return model
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != target_vocab:
        raise DraftsmithError(
            f"The drafter's vocabulary ({rows} tokens) differs from the target's ({target_vocab} tokens)",
            getattr(config, "_name_or_path", "drafter"), "A parallel drafter must share the target's tokenizer")
    model.resize_token_embeddings(target_vocab + 1, mean_resizing=False)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[target_vocab] = weight[:target_vocab].float().mean(0).to(weight.dtype)
    config.draftsmith_kind = "parallel"
    config.draftsmith_mask_token_id = target_vocab
    config.pard_token = target_vocab
    config.draftsmith_target_vocab_size = target_vocab
    return model


def build_parallel(target_model: torch.nn.Module, d, dry: bool = False) -> torch.nn.Module:
    """The parallel drafter of a recipe's `drafter` section: a transformers causal LM from
    `drafter.init_from` (a folder, GGUF file or hub id of a model sharing the target's tokenizer: a
    small model of the family, an exported small_lm or parallel drafter), else built from the
    target's layers like small_lm. dry: the init_from model's architecture only (the meta device)."""
    from transformers import AutoModelForCausalLM

    vocab = target_model.get_output_embeddings().weight.shape[0]
    if d.init_from is not None and dry:
        model = AutoModelForCausalLM.from_config(target_config(d.init_from))
    elif d.init_from is not None:
        folder, _ = resolve_model_folder(d.init_from)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        print(f"[draftsmith] parallel drafter starts from {d.init_from}", flush=True)
    else:
        model = build_small_lm(target_model, d.num_layers, d.hidden_size, d.intermediate_size, d.init,
                               d.layers_from_target)
    model = add_mask_token(model, vocab)
    model.config.draftsmith_parallel_k = d.parallel_k
    return model


def freeze_embeddings_but_mask(model: torch.nn.Module) -> None:
    """Keep the token embeddings and the LM head as they are, except the mask token's row, which must
    learn: its gradient alone passes (the LM head's rows past the target's vocabulary are never read).
    AdamW leaves rows with zero gradient untouched unless weight decay is on (run.py refuses that)."""
    mask_id = mask_token_id(model)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight

    def mask_row_only(grad: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(grad)
        out[mask_id] = grad[mask_id]
        return out

    embed.register_hook(mask_row_only)
    if head is not embed:
        head.requires_grad_(False)


# ---------------------------------------------------------------------------------- decoding

class ParallelProposer:
    """Drafts k tokens with one forward over [new committed tokens..., mask x (k-1)]. The drafter's
    KV cache holds the committed tokens only: it is rolled back to the longest prefix that agrees with
    the sequence before each draft (as SmallLMProposer's), and past the mask positions after it."""

    hidden_layers: tuple[int, ...] = ()

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.mask_id = mask_token_id(model)
        self.vocab_size = target_vocab_size(model)
        # masks past the trained depth predict noise: `--k auto` (k_max 8) drafts at most this many
        self.max_k = getattr(model.config, "draftsmith_parallel_k", None) or 1 << 30
        self.cache = None
        self.fed: list[int] = []      # committed tokens whose keys/values the cache holds

    def reset(self) -> None:
        self.cache = new_cache(self.model)
        self.fed = []

    def observe(self, state: DecodeState) -> None:
        pass  # token-level drafter: everything it needs is in state.tokens

    def propose(self, state: DecodeState, k: int, sampler: Sampler, tree: TreeShape | None = None) -> Draft:
        return self.propose_rows([self], [state], [k], [sampler], tree)[0]

    @classmethod
    @torch.inference_mode()
    def propose_rows(cls, proposers: list["ParallelProposer"], states: list[DecodeState], ks: list[int],
                     samplers: list[Sampler], tree: TreeShape | None = None) -> list[Draft]:
        """k draft positions per sequence from ONE forward over every row (models/lm_rows.py): a row feeds what
        its cache lacks, then k - 1 masks, which leave no trace in its cache."""
        ks = [min(k, p.max_k) for p, k in zip(proposers, ks)]
        news = [catch_up(p.cache, p.fed, s.tokens) for p, s in zip(proposers, states)]
        feeds = [LMFeed(new + [p.mask_id] * (k - 1)) for p, new, k in zip(proposers, news, ks)]
        outs = forward_rows(proposers[0].model, [p.cache for p in proposers], feeds, max(ks))
        drafts = []
        for p, new, k, out, sampler in zip(proposers, news, ks, outs, samplers):
            rollback(p.cache, len(p.fed) + len(new))          # the masks leave no trace
            p.fed += new
            drafts.append(p._draft(out[-k:, : p.vocab_size], k, sampler, tree))
        return drafts

    def _draft(self, logits: torch.Tensor, k: int, sampler: Sampler, tree: TreeShape | None) -> Draft:
        """The draft from the k positions' logits [k, V]: the last real token's, then the masks'. With a tree,
        every node at depth d takes its children from position d's logits (a mask predicts its position given
        the committed prefix only, as Medusa's heads do), so a static or dynamic tree costs no extra drafter
        forward."""
        if tree is not None:
            return grow_draft(lambda nodes, tokens, parents: logits[[depths(parents)[n] for n in nodes]],
                              logits[0], k, sampler, tree)
        tokens, qs, conf = [], [], []
        for row in logits:
            token, q = sampler(row)
            tokens.append(token)
            qs.append(q)
            # the drafter's probability of its token: what `--k auto` calibrates into acceptance
            conf.append(float((q if q is not None else row.softmax(-1))[token]))
        return Draft(tokens, None if qs[0] is None else torch.stack(qs), conf=conf)

