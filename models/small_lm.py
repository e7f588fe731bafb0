"""Kind `small_lm`: a standalone causal LM that shares the target's tokenizer (DistillSpec-style).

Drafting keeps the drafter's own KV cache. Before each draft the cache is rolled back to the
longest prefix that still agrees with the decoded sequence, so rejected drafts leave no trace.
"""

from __future__ import annotations

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.models.lm_rows import LMFeed, forward_rows
from draftsmith.models.prefix import catch_up
from draftsmith.models.target import new_cache, rollback
from draftsmith.protocol.drafting import Draft, TreeShape, grow_rows
from draftsmith.protocol.proposer import DecodeState, Sampler
from draftsmith.protocol.tree import depths


class SmallLMProposer:
    hidden_layers: tuple[int, ...] = ()

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.cache = None
        self.fed: list[int] = []      # tokens whose keys/values the drafter cache holds

    def reset(self) -> None:
        self.cache = new_cache(self.model)
        self.fed = []

    def observe(self, state: DecodeState) -> None:
        pass  # token-level drafter: everything it needs is in state.tokens

    def propose(self, state: DecodeState, k: int, sampler: Sampler, tree: TreeShape | None = None) -> Draft:
        return self.propose_rows([self], [state], [k], [sampler], tree)[0]

    @classmethod
    @torch.inference_mode()
    def propose_rows(cls, proposers: list["SmallLMProposer"], states: list[DecodeState], ks: list[int],
                     samplers: list[Sampler], tree: TreeShape | None = None) -> list[Draft]:
        """Drafts for one or several sequences: each drafting round is ONE drafter forward over every row still
        drafting (models/lm_rows.py). A row first feeds what its cache lacks (rolled back to the longest prefix
        that agrees with its sequence); chain rows stay cached (the next step reuses those the target accepted),
        a tree's rows are dropped after the draft."""
        news = [catch_up(p.cache, p.fed, s.tokens) for p, s in zip(proposers, states)]
        roots = [logits[-1] for logits in cls._feed(proposers, [LMFeed(new) for new in news], 1)]
        bases = [len(p.fed) for p in proposers]
        rows: list[dict[int, int]] = [{} for _ in proposers]     # per row: tree node -> its row in the cache

        def expand_rows(requests: dict) -> dict:
            who = list(requests)
            if tree is None:
                feeds = [LMFeed([requests[r][1][requests[r][0][0]]]) for r in who]
            else:
                feeds = [proposers[r]._node_feed(*requests[r], bases[r], rows[r]) for r in who]
            return dict(zip(who, cls._feed([proposers[r] for r in who], feeds, max(len(f.tokens) for f in feeds))))

        drafts = grow_rows(expand_rows, roots, ks, samplers, tree)
        if tree is not None:
            for p, base in zip(proposers, bases):
                rollback(p.cache, base)
                del p.fed[base:]
        return drafts

    @staticmethod
    def _feed(proposers: list["SmallLMProposer"], feeds: list[LMFeed], keep: int) -> list[torch.Tensor]:
        out = forward_rows(proposers[0].model, [p.cache for p in proposers], feeds, keep)
        for p, feed in zip(proposers, feeds):
            p.fed += feed.tokens
        return out

    def _node_feed(self, nodes: list[int], tokens: list[int], parents: list[int], base: int,
                   rows: dict[int, int]) -> LMFeed:
        """Tree nodes to feed (their ancestors are already cached): each row sees the committed
        tokens, its ancestors' rows and itself, at position base - 1 + depth."""
        cached = len(self.fed)
        see = torch.zeros(len(nodes), cached + len(nodes), dtype=torch.bool)
        see[:, :base] = True
        depth = depths(parents)
        for r, node in enumerate(nodes):
            parent = parents[node]
            while parent >= 0:
                see[r, rows[parent]] = True
                parent = parents[parent]
            see[r, cached + r] = True
            rows[node] = cached + r
        return LMFeed([tokens[n] for n in nodes], see, [base - 1 + depth[node] for node in nodes])

    def hf_assisted_kwargs(self, k: int) -> dict:
        """transformers' assisted generation with the same drafter and a constant draft length k."""
        cfg = self.model.generation_config
        cfg.num_assistant_tokens = k
        cfg.num_assistant_tokens_schedule = "constant"
        return {"assistant_model": self.model}


class SmallLMTrainModule(torch.nn.Module):
    """What the trainer wraps (DDP/FSDP/DeepSpeed) for a small_lm drafter: the LM head runs only on
    the trained positions, which saves the head's cost on prompts and padding."""

    target_layers = ()

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, mask, target_hidden=None, t_logits=None):
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        logits = self.model.get_output_embeddings()(hidden[:, :-1][mask])                   # [N, V]
        return logits, logits.new_zeros(())


def check_vocab(drafter_vocab: int, target_vocab: int, drafter_name: str) -> None:
    if drafter_vocab != target_vocab:
        raise DraftsmithError(
            f"The drafter's vocabulary ({drafter_vocab} tokens) differs from the target's ({target_vocab} tokens)",
            drafter_name, "A small_lm drafter must share the target's tokenizer")



def truncated_copy(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A copy of `model`'s embeddings, first `num_layers` decoder layers, final norm and LM head
    (the `truncated:N` drafter spec)."""
    total = model.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise DraftsmithError(f"A truncated drafter needs between 1 and {total} layers", num_layers)
    drafter = build_small_lm(model, num_layers, layers_from_target=list(range(num_layers)))
    return drafter.to(next(model.parameters()).device)


def evenly_spaced(num_layers: int, total: int) -> list[int]:
    """`num_layers` target layer indices spread from the first to the last layer."""
    if num_layers == 1:
        return [total - 1]
    return [round(i * (total - 1) / (num_layers - 1)) for i in range(num_layers)]


def build_small_lm(target_model: torch.nn.Module, num_layers: int, hidden_size: int | None = None,
                   intermediate_size: int | None = None, init: str = "target",
                   layers_from_target: list[int] | None = None) -> torch.nn.Module:
    """A causal LM of the target's family with fewer (optionally narrower) layers.

    init="target" copies the embeddings, the chosen decoder layers (evenly spaced by default, so
    the first and the last layer are kept), the final norm and the LM head; a narrower drafter
    cannot reuse the target's matrices and starts random. The result is a plain transformers model
    whose config records `draftsmith_kind = "small_lm"`.
    """
    import copy

    from transformers import AutoModelForCausalLM

    total = target_model.config.num_hidden_layers
    config = copy.deepcopy(target_model.config)
    config.num_hidden_layers = num_layers
    narrower = hidden_size not in (None, config.hidden_size) or intermediate_size not in (None, config.intermediate_size)
    if hidden_size is not None:
        config.hidden_size = hidden_size
        config.head_dim = hidden_size // config.num_attention_heads
    if intermediate_size is not None:
        config.intermediate_size = intermediate_size
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    config.draftsmith_kind = "small_lm"
    dtype = next(target_model.parameters()).dtype
    drafter = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if init == "random" or narrower:
        return drafter
    if init != "target":
        raise DraftsmithError("drafter.init must be 'target' or 'random'", init)
    chosen = layers_from_target if layers_from_target is not None else evenly_spaced(num_layers, total)
    if len(chosen) != num_layers or not all(0 <= i < total for i in chosen):
        raise DraftsmithError(f"drafter.layers_from_target must list {num_layers} layer indices in [0, {total})", chosen)
    source = target_model.state_dict()
    state = {}
    for name, tensor in source.items():
        if ".layers." in name:
            prefix, rest = name.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            if int(index) in chosen:
                state[f"{prefix}.layers.{chosen.index(int(index))}.{tail}"] = tensor
        else:
            state[name] = tensor
    drafter.load_state_dict(state, strict=False)
    drafter.tie_weights()
    config.draftsmith_layers_from_target = chosen
    return drafter
