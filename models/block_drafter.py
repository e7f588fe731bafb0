"""Block drafters (DFlash, Chen et al. 2602.06036; DSpark, 2607.05147): a small transformer drafts a
whole block of tokens in ONE forward, conditioned on the target's features.

The layout is vLLM speculators 0.9.0's `dflash` / `dspark` types (DFlashDraftModel), which vLLM loads:
- context: fc([the target's tapped layers]) -> hidden_norm, one feature per committed position;
- every draft layer attends over [context ; block]: the context's keys and values are THAT layer's
  k_proj / v_proj of the context features (k_norm, RoPE at their own positions) — KV injection: the
  drafter never re-reads the context through its layers, and in decoding the context's keys and
  values are computed once per committed position and cached (models/kv_injection.py);
- the block: [anchor token, mask x (B-1)] at positions n..n+B-1, non-causal inside the block; its
  embedding is the target's (frozen, shared, never saved), the mask token a target id
  (models/mask_token.py);
- Qwen3-style layers (q_norm / k_norm per head, SwiGLU), a final norm, and an LM head over the draft
  vocabulary (models/draft_vocab.py): the target's LM-head rows, frozen.

The anchor is the newest token x_n, which the target has not seen yet; the context holds the target's
features of positions < n. Which slot drafts what is speculators' `sample_from_anchor`:
- false (DFlash): slot j >= 1 — the mask at position n+j — drafts x_{n+j}: B-1 drafts per forward;
- true (DSpark): slot j drafts x_{n+j+1}: B drafts per forward.
Draft i (0-based) reads slot i + offset (offset 1 for DFlash, 0 for DSpark) and is trained against
the target's distribution at position n+i.

Hooks a kind may add (kind dspark, models/dspark.py): `bias` — a logit bias for draft i from the token
before it (x_n for draft 0, then the drafted token: the block stays one forward, the bias is a tiny
serial step); `confidence` — draft i's predicted acceptance, which `--k auto` uses instead of its
online calibration.

Training (DFlash's): per sequence, up to `max_anchors` random anchors among its trained positions;
each anchor's block attends to the context before the anchor and to its own block, all blocks of a
batch in one forward. The loss is the recipe's objective (distill/objective.py) per draft, weighed
along the block by the position weights (default exp(-i/gamma), DFlash's decay).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.errors import DraftsmithError
from draftsmith.models.draft_vocab import DraftVocab
from draftsmith.models.kv_injection import InjectedLayer
from draftsmith.models.layers import HeadIO, LayerShape, RMSNorm, norm_weight, target_parts
from draftsmith.models.mask_blocks import depth_stats
from draftsmith.models.target import data_token_probs
from draftsmith.models.row_batch import pad_rows
from draftsmith.protocol.drafting import Draft, TreeShape, grow_draft
from draftsmith.protocol.proposer import DecodeState, Sampler
from draftsmith.protocol.tree import depths


@dataclass
class BlockConfig(LayerShape):
    num_layers: int = 1
    block_size: int = 8
    draft_vocab_size: int = 0
    aux_layers: list[int] = field(default_factory=list)   # target layer OUTPUT ids, 0-based (as eagle3)
    target_hidden_size: int = 0
    mask_token_id: int = 0
    sample_from_anchor: bool = False
    layer_convention: str = "output of target decoder layer i, 0-based (transformers hidden_states[i + 1])"
    draftsmith_kind: str = "dflash"

    @property
    def offset(self) -> int:
        """The slot of the first draft: 1 when the anchor slot drafts nothing (DFlash), else 0."""
        return 0 if self.sample_from_anchor else 1

    @property
    def drafts(self) -> int:
        """Drafts per forward."""
        return self.block_size - self.offset


class BlockHead(DraftVocab, HeadIO, nn.Module):
    """fc + hidden_norm + KV-injected layers + norm + draft LM head (speculators' tensor names)."""

    config_class = BlockConfig

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.config = config
        width = config.target_hidden_size or config.hidden_size
        self.fc = nn.Linear(len(config.aux_layers) * width, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList([InjectedLayer(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)    # the target's rows, frozen (DFlash, speculators)
        self._init_vocab()

    def fuse(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """The target's tapped layers [..., Ht] each -> the context features [..., H]."""
        return self.hidden_norm(self.fc(torch.cat(hidden, dim=-1)))

    def context(self, features: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's keys and values of the context features [B, L, H] at `positions` [B, L]."""
        return [layer.self_attn.project_kv(features, positions) for layer in self.layers]

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, context: list, mask: torch.Tensor | None = None):
        """The block's hidden states [B, Q, H] from its embeddings [B, Q, H] at `positions` [B, Q], attending to
        the `context` keys / values and to the block itself (`mask` [B, 1, Q, L + Q] bool, None: everything)."""
        x = embeds
        for layer, kv in zip(self.layers, context):
            x = layer(x, positions, kv, mask)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))     # [..., Vd]

    def bias(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        """A logit bias [..., Vd] for drafts whose previous token is `prev_ids` [...]; None: none (DFlash)."""
        return None

    def confidence(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        """Predicted acceptance logits [...] of drafts; None: the kind has no confidence head (DFlash)."""
        return None

    @property
    def predicts_acceptance(self) -> bool:
        """Whether `confidence` returns predictions (a confidence head)."""
        return False


# ---------------------------------------------------------------------------------- building

def build_block_head(cls, target_model: nn.Module, aux_layers: list[int], draft_ids: torch.Tensor, mask_token_id: int,
                     num_layers: int, block_size: int, init: str = "target", layers_from_target=None, **extra):
    """A fresh head of class `cls` (a BlockHead). Always: the LM head rows and the final norm from the
    target's (the LM head frozen). init=target (Llama-style targets): the draft layers copied from the
    target's last `num_layers` layers (or `layers_from_target`), q_norm / k_norm at 1, hidden_norm as
    the first copied layer's input norm, fc passing the highest tapped layer through; init=random:
    PyTorch's default init."""
    cfg = target_model.config
    n = cfg.num_hidden_layers
    bad = [i for i in aux_layers if not 0 <= i < n]
    if not aux_layers or bad:
        raise DraftsmithError("drafter.aux_layers must be target layer indices in [0, num_layers)", aux_layers,
                              f"This target has {n} layers; null picks three spread over it")
    vocab = cfg.vocab_size
    if not 0 <= mask_token_id < vocab:
        raise DraftsmithError("drafter.mask_token_id must be an id of the target's vocabulary", mask_token_id,
                              f"Use an id in [0, {vocab}), or null to pick an unused one")
    c = cls.config_class.from_target(cfg, num_layers=num_layers, block_size=block_size, draft_vocab_size=len(draft_ids),
                                     aux_layers=list(aux_layers), target_hidden_size=cfg.hidden_size,
                                     mask_token_id=mask_token_id, **extra)
    head = cls(c)
    head.set_vocab(draft_ids)
    _, norm, lm_head = target_parts(target_model)
    with torch.no_grad():
        head.norm.weight.copy_(norm_weight(norm))
        head.lm_head.weight.copy_(lm_head.weight[draft_ids.to(lm_head.weight.device)])
        if init == "target":
            _copy_target_layers(head, target_model, layers_from_target)
    return head.to(next(target_model.parameters()).dtype)


def _copy_target_layers(head: BlockHead, target_model: nn.Module, chosen) -> None:
    cfg = target_model.config
    layers = getattr(target_model, target_model.base_model_prefix).layers
    n, h = len(layers), cfg.hidden_size
    chosen = list(chosen) if chosen is not None else list(range(n - len(head.layers), n))
    if len(chosen) != len(head.layers) or not all(0 <= i < n for i in chosen):
        raise DraftsmithError("drafter.layers_from_target must name one target layer per draft layer",
                              chosen, f"Give {len(head.layers)} indices in [0, {n}), or null for the last ones")
    first = layers[chosen[0]]
    llama_like = getattr(cfg, "hidden_act", None) == "silu" and not hasattr(first, "pre_feedforward_layernorm")
    if llama_like:      # other families (Gemma: GELU, sandwich norms) keep random layers
        for mine, i in zip(head.layers, chosen):
            src = dict(layers[i].named_parameters())
            for name, p in mine.named_parameters():
                if name in src and src[name].shape == p.shape:
                    p.copy_(norm_weight(layers[i].get_submodule(name.rsplit(".", 1)[0])) if "norm" in name
                            else src[name])
        head.hidden_norm.weight.copy_(norm_weight(first.input_layernorm))
    width = head.fc.weight.shape[1] // len(head.config.aux_layers)
    head.fc.weight.zero_()
    head.fc.weight[:, -width:] = torch.eye(h, width)


# ---------------------------------------------------------------------------------- decoding

class BlockProposer:
    """One head forward per step drafts the whole block: the anchor (the newest token) and the masks
    attend to the cached context keys / values. Chains and trees come from the block's slots: a node at
    depth d takes its children from slot d (plus the kind's bias from the node's own token), so a tree
    costs no extra forward. `observe` appends the context of the newly committed positions."""

    def __init__(self, head: BlockHead, target_model: nn.Module):
        self.head = head.eval().requires_grad_(False)
        self.embed = target_parts(target_model)[0]
        c = head.config
        self.hidden_layers = tuple(c.aux_layers)
        self.device = next(target_model.parameters()).device
        self.dtype = next(target_model.parameters()).dtype
        self.head.to(device=self.device, dtype=self.dtype)
        self.max_k = c.drafts           # `--k auto` never asks for more than one block drafts
        self.mask_id = c.mask_token_id

    def reset(self) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []   # per layer, [1, kv heads, length, head dim]
        self.length = 0

    def _rollback(self, length: int) -> None:
        if self.length > length:
            self.kv = [(k[:, :, :length], v[:, :, :length]) for k, v in self.kv]
        self.length = min(self.length, length)

    @torch.inference_mode()
    def observe(self, state: DecodeState) -> None:
        """Positions hidden_start..committed-1 join the context."""
        self.observe_rows([self], [state])

    @classmethod
    @torch.inference_mode()
    def observe_rows(cls, proposers: list["BlockProposer"], states: list[DecodeState]) -> None:
        """observe for several sequences: the context keys and values of every row's new positions from one fc
        and one projection per layer (they are per position: the rows need no padding)."""
        one = proposers[0]
        for p, state in zip(proposers, states):
            p._rollback(state.hidden_start)
            if p.length != state.hidden_start:
                raise DraftsmithError("The block drafter's context lost track of the decoder",
                                      (p.length, state.hidden_start), "Call reset() before a new sequence")
        counts = [state.hidden[0].shape[0] for state in states]
        hidden = [torch.cat([state.hidden[i] for state in states]).to(one.dtype) for i in range(len(states[0].hidden))]
        feats = one.head.fuse(hidden)[None]                                                  # [1, N, H]
        positions = torch.cat([torch.arange(s.hidden_start, s.hidden_start + n, device=one.device)
                               for s, n in zip(states, counts)])[None]
        new = [(k.split(counts, 2), v.split(counts, 2)) for k, v in one.head.context(feats, positions)]
        for r, (p, n) in enumerate(zip(proposers, counts)):
            mine = [(k[r], v[r]) for k, v in new]
            p.kv = mine if not p.kv else [(torch.cat([k, k2], 2), torch.cat([v, v2], 2))
                                          for (k, v), (k2, v2) in zip(p.kv, mine)]
            p.length += n

    @torch.inference_mode()
    def propose(self, state: DecodeState, k: int, sampler: Sampler, tree: TreeShape | None = None) -> Draft:
        k = min(k, self.max_k)
        if k < 1:
            return Draft([])
        ids, positions = self._block(state)
        hidden = self.head(self.embed(ids).to(self.dtype), positions, self.kv)[0]    # [B, H]
        return self._drafted(hidden, state, k, sampler, tree)

    @classmethod
    @torch.inference_mode()
    def propose_rows(cls, proposers: list["BlockProposer"], states: list[DecodeState], ks: list[int],
                     samplers: list[Sampler], tree: TreeShape | None = None) -> list[Draft]:
        """propose for several sequences: every row's block in ONE head forward, each row's context padded to the
        longest (models/row_batch.py) and hidden from the other rows by the mask."""
        one = proposers[0]
        ks = [min(k, p.max_k) for p, k in zip(proposers, ks)]
        rows = [r for r, k in enumerate(ks) if k > 0]
        drafts = [Draft([]) for _ in proposers]
        if not rows:
            return drafts
        blocks = [proposers[r]._block(states[r]) for r in rows]
        ids, positions = torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
        lengths = [proposers[r].length for r in rows]
        width, size = max(lengths), ids.shape[1]
        context = [tuple(pad_rows([proposers[r].kv[layer][i] for r in rows], width) for i in range(2))
                   for layer in range(len(one.kv))]
        mask = torch.zeros(len(rows), 1, size, width + size, dtype=torch.bool, device=one.device)
        for j, n in enumerate(lengths):
            mask[j, 0, :, :n] = True                  # its own context
        mask[:, 0, :, width:] = True                  # and its whole block
        hidden = one.head(one.embed(ids).to(one.dtype), positions, context, mask)     # [rows, B, H]
        for j, r in enumerate(rows):
            drafts[r] = proposers[r]._drafted(hidden[j], states[r], ks[r], samplers[r], tree)
        return drafts

    def _block(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's ids and positions [1, B]: [newest token, mask x (B - 1)] from the newest token's position."""
        n = len(state.tokens) - 1                     # the anchor's position: the newest token's
        if self.length != n:
            raise DraftsmithError("The block drafter's context does not end before the newest token",
                                  (self.length, n), "observe() every verified step before propose()")
        size = self.head.config.block_size
        ids = torch.tensor([[state.tokens[-1]] + [self.mask_id] * (size - 1)], device=self.device)
        return ids, torch.arange(n, n + size, device=self.device)[None]

    def _drafted(self, hidden: torch.Tensor, state: DecodeState, k: int, sampler: Sampler,
                 tree: TreeShape | None) -> Draft:
        """The draft from the block's hidden states [B, H]."""
        c = self.head.config
        slots = hidden[c.offset: c.offset + k]                                       # draft i reads slot i + offset
        base = self.head.logits(slots).float()                                       # [k, Vd]
        anchor = state.tokens[-1]

        def after(rows: list[int], prev: list[int]) -> torch.Tensor:
            """Draft logits [len(rows), V] of draft `rows` (0-based) whose previous tokens are `prev`."""
            logits = base[rows]
            bias = self.head.bias(torch.tensor(prev, device=self.device), slots[rows])
            return self.head.to_target_logits(logits if bias is None else logits + bias.float())

        def expand(nodes: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            d = depths(parents)                       # 1-based: a node at depth d drafts its children from row d
            return after([d[i] for i in nodes], [tokens[i] for i in nodes])

        accept = None
        if self.head.predicts_acceptance:
            def accept(prev: int | None, depth: int) -> float:
                """Predicted acceptance of a node at `depth` (1-based) whose previous token is `prev`."""
                token = anchor if prev is None else prev
                logit = self.head.confidence(torch.tensor([token], device=self.device), slots[depth - 1: depth])
                return float(torch.sigmoid(logit.float())[0])
        return grow_draft(expand, after([0], [anchor])[0], k, sampler, tree, accept=accept)


# ---------------------------------------------------------------------------------- training

def block_attention(attention: torch.Tensor, anchors: torch.Tensor, real: torch.Tensor, block: int) -> torch.Tensor:
    """[B, 1, A*block, T + A*block] bool (True = attend): the block of anchor a sees the context positions
    < a that are not padding, and its own block whole; a padding block sees itself only."""
    b, t = attention.shape
    a = anchors.shape[1]
    device = attention.device
    q = a * block
    owner = torch.arange(a, device=device).repeat_interleave(block)                     # [Q] block of each query
    anchor_q = anchors[:, owner]                                                          # [B, Q]
    ctx = (torch.arange(t, device=device)[None, None, :] < anchor_q[:, :, None]) & attention.bool()[:, None, :]
    ctx = ctx & real[:, owner][:, :, None]
    own = (owner[:, None] == owner[None, :])[None].expand(b, q, q)
    return torch.cat([ctx, own], dim=2)[:, None]


class BlockTrainModule(nn.Module):
    """What the trainer wraps for the block kinds. Every training step draws up to `max_anchors` anchors
    per sequence among its trained positions; held-out evaluation takes every trained position (in slices
    of `max_anchors`), so its figures are deterministic. Draft i of the block at anchor a predicts token
    a+i+1 against the target's distribution at position a+i restricted (renormalised) to the draft
    vocabulary, rows masked where the target's argmax lies outside it (as EAGLE-3's loss) or where
    position a+i is not trained. A kind with a confidence head adds `confidence_weight` x its BCE against
    each draft's acceptance α = Σ min(p, q) (detached), weighed exp(-i/gamma) along the block (DSpark's).
    Returns the first draft's logits on every trained position in eval mode (target vocabulary, -inf
    outside the draft one) for the held-out figures, and the loss (`owns_loss`)."""

    owns_loss = True

    def __init__(self, head: BlockHead, target_model: nn.Module, objective, max_anchors: int,
                 confidence_weight: float = 1.0):
        super().__init__()
        self.model = head
        self.objective = objective
        self.max_anchors = max_anchors
        self.confidence_weight = confidence_weight
        self._target = (target_parts(target_model),)     # a tuple: not registered, not saved
        self.target_layers = tuple(head.config.aux_layers)
        self.train_stats: dict[str, float] = {}
        self.step_stats: dict[str, float] = {}

    def _anchors(self, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(anchors [B, A], real [B, A]) slices: a random draw of up to max_anchors trained positions per row
        in training, every trained position in eval mode."""
        count = int(mask.sum(1).max()) if mask.numel() else 0
        if count == 0:
            return []
        if self.training:
            a = min(self.max_anchors, count)
            score = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)
            anchors = score.topk(a, dim=1).indices.sort(dim=1).values
            return [(anchors, mask.gather(1, anchors))]
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :count]    # trained first, in order
        real = mask.gather(1, order)
        return [(order[:, i:i + self.max_anchors], real[:, i:i + self.max_anchors])
                for i in range(0, count, self.max_anchors)]

    def forward(self, input_ids, attention_mask, mask, target_hidden, t_logits):
        head = self.model
        c = head.config
        b, t = input_ids.shape
        r, d, size = t - 1, c.drafts, c.block_size
        ids = head.draft_ids
        with torch.no_grad():   # the target's [N, V] logits stay as they came (bf16 under autocast): no fp32 copy
            row_of = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
            row_of[mask] = torch.arange(int(mask.sum()), device=mask.device)
            t_arg = t_logits.argmax(-1)
            log_p = torch.log_softmax(t_logits[:, ids].float(), dim=-1)                 # [N, Vd]
            learnable = head.t2d[t_arg]
            labels = head.to_draft(input_ids[:, 1:])                                    # [B, R] the data's token
            gold = None
            if self.objective.position_weights == "reach":
                gold = data_token_probs(t_logits, input_ids[:, 1:][mask], mask)         # [B, R]
        table = self._target[0][0]
        feats = head.fuse([x.to(head.fc.weight.dtype) for x in target_hidden])          # [B, T, H]
        kv = head.context(feats, torch.arange(t, device=feats.device).expand(b, -1))
        parts = [self._slice(input_ids, attention_mask, mask, kv, table, anchors, real, row_of)
                 for anchors, real in self._anchors(mask)]
        if not parts:
            loss = 0.0 * feats.sum()
            return (feats.new_zeros(0, c.draft_vocab_size) if self.training else
                    feats.new_full((0, c.vocab_size), float("-inf"))), loss
        logits = torch.cat([p["logits"] for p in parts])
        rows = torch.cat([p["rows"] for p in parts])
        depth = torch.cat([p["depth"] for p in parts])
        keep = learnable[rows]
        loss_rows, alpha = self.objective.rows(log_p[rows][keep], logits[keep], labels[mask][rows][keep])
        decay = torch.exp(-torch.arange(d, dtype=torch.float32, device=logits.device) / self.objective.gamma)
        kept_depth = depth[keep]
        if keep.any():
            means = torch.stack([alpha[kept_depth == i].mean() if (kept_depth == i).any() else alpha.new_zeros(())
                                 for i in range(d)])
            w = self.objective.along(d, default=decay.cpu(), alpha=means, gold=gold).to(logits.device)
            if w.dim() > 1:     # reach: per (depth, row, anchor) -> per kept draft
                anchor = torch.cat([p["anchor"] for p in parts])[keep]
                batch = torch.cat([p["batch"] for p in parts])[keep]
                w = w[kept_depth, batch, anchor]
            else:
                w = w[kept_depth]
            loss = (w * loss_rows).sum() / w.sum().clamp_min(1e-12)
        else:   # no row to learn from: a zero that still backpropagates (and keeps DDP's buckets whole)
            loss = 0.0 * logits.sum()
        conf = [p["confidence"] for p in parts]
        conf_error = None
        if conf[0] is not None and keep.any():
            conf = torch.cat(conf)[keep].float()
            target = alpha.detach().float()
            bce = F.binary_cross_entropy_with_logits(conf, target, reduction="none")
            wc = decay[kept_depth]
            loss = loss + self.confidence_weight * (wc * bce).sum() / wc.sum().clamp_min(1e-12)
            conf_error = float((torch.sigmoid(conf.detach()) - target).abs().mean())
        if self.training:
            self.train_stats = self.objective.stats(alpha, kept_depth, d)
            if conf_error is not None:
                self.train_stats["confidence_abs_error"] = conf_error
            return logits[:0], loss
        with torch.no_grad():
            hit = ids[logits.argmax(-1)] == t_arg[rows]
            self.step_stats = depth_stats(hit, depth, d)
            if conf_error is not None:
                self.step_stats["confidence_abs_error"] = conf_error
            first = depth == 0
            full = logits.new_full((t_logits.shape[0], c.vocab_size), float("-inf"))
            full[rows[first][:, None], ids[None, :]] = logits[first]
        return full, loss

    def _slice(self, input_ids, attention_mask, mask, kv, table, anchors, real, row_of) -> dict:
        """The drafts of one slice of anchors: logits [M, Vd] (bias added), their target rows, depths, anchors and
        batch rows, and confidence logits (or None), for the M drafts whose target position is trained."""
        head = self.model
        c = head.config
        b, t = input_ids.shape
        a, size, d = anchors.shape[1], c.block_size, c.drafts
        block_ids = torch.full((b, a, size), c.mask_token_id, dtype=torch.long, device=input_ids.device)
        block_ids[:, :, 0] = input_ids.gather(1, anchors)
        positions = (anchors[:, :, None] + torch.arange(size, device=anchors.device)).reshape(b, a * size)
        embeds = table(block_ids.reshape(b, a * size)).detach().to(head.fc.weight.dtype)
        see = block_attention(attention_mask, anchors, real, size)
        hidden = head(embeds, positions, kv, see).reshape(b, a, size, -1)[:, :, c.offset: c.offset + d]   # [B, A, D, H]
        target_pos = anchors[:, :, None] + torch.arange(d, device=anchors.device)                       # [B, A, D]
        inside = target_pos < mask.shape[1]
        clamped = target_pos.clamp(max=mask.shape[1] - 1)
        ok = real[:, :, None] & inside & mask.gather(1, clamped.reshape(b, -1)).reshape(b, a, d)
        prev = input_ids.gather(1, clamped.reshape(b, -1)).reshape(b, a, d)[ok]       # the token before each draft
        h = hidden[ok]
        logits = head.logits(h).float()
        bias = head.bias(prev, h)
        if bias is not None:
            logits = logits + bias.float()
        conf = head.confidence(prev, h)
        return {"logits": logits, "rows": row_of.gather(1, clamped.reshape(b, -1)).reshape(b, a, d)[ok],
                "depth": torch.arange(d, device=ok.device).expand(b, a, d)[ok],
                "anchor": anchors[:, :, None].expand(b, a, d)[ok],
                "batch": torch.arange(b, device=ok.device)[:, None, None].expand(b, a, d)[ok],
                "confidence": conf}
