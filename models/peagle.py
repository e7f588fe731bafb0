"""Kind `eagle3` with `parallel: true`: P-EAGLE, an EAGLE-3 head (Li et al. 2503.01840) that drafts
k tokens in ONE forward, with PARD's mask-token parallel drafting (An et al. 2504.18583). The layout
is vLLM speculators' `peagle` type (PEagleDraftModel, speculators 0.9.0), which the export writes.

Rows are EAGLE-3's: row t reads fc(the target's tapped layers at t) beside the embedding of token
t+1, at position t, and predicts token t+2. When the newest token is x_n (row n-1 the last committed
one), drafting appends k-1 mask rows: the row of depth d reads the mask token's embedding and
fc(mask_hidden) — a learnt [3H] stand-in for target features that do not exist yet — at position
n-1+d, and predicts x_{n+1+d}. One causal forward over [rows not read yet, masks] gives all k
drafts; the masks are cropped from the head's cache right after. The head never reads its own
features back (no training-time test): training appends the mask blocks of models/mask_blocks.py
(conditional drop-token) after every sequence's rows.

Mask token: `mask_token_id` is an id of the target's vocabulary whose embedding is the head's own
`mask_embedding` (learnt; speculators keeps it as that row of its embed_tokens). Every other token
embeds as the target's. Whenever the id occurs as a real token it embeds as the mask too, in
draftsmith as in speculators, so the default is a token the training data never holds
(models/mask_token.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.errors import DraftsmithError
from draftsmith.models.layers import target_parts
from draftsmith.models.eagle3 import Eagle3Config, Eagle3Head, Eagle3Proposer
from draftsmith.models.target import data_token_probs
from draftsmith.models.mask_blocks import (block_attention, cod_fractions, cod_keep, depth_stats, gather_blocks,
                                          valid_anchors)
from draftsmith.models.row_batch import Feed
from draftsmith.protocol.drafting import Draft, TreeShape, grow_draft
from draftsmith.protocol.proposer import DecodeState, Sampler
from draftsmith.protocol.tree import depths


@dataclass
class PEagleConfig(Eagle3Config):
    parallel: bool = True
    parallel_k: int = 4            # tokens per forward training covered (depth 0 + parallel_k - 1 masks)
    mask_token_id: int = 0         # the target id whose embedding is the head's mask_embedding


class PEagleHead(Eagle3Head):
    """EAGLE-3's head + `mask_hidden` [1, 1, 3H] (speculators' name and shape) and `mask_embedding` [H]."""

    config_class = PEagleConfig

    def __init__(self, config: PEagleConfig):
        super().__init__(config)
        width = config.target_hidden_size or config.hidden_size
        self.mask_hidden = nn.Parameter(torch.randn(1, 1, 3 * width))    # speculators' init
        self.mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))

    def embed(self, ids: torch.Tensor, table) -> torch.Tensor:
        """The target's embedding `table` of `ids`, the mask token's row replaced by the head's own."""
        e = table(ids)
        return torch.where((ids == self.config.mask_token_id)[..., None], self.mask_embedding.to(e.dtype), e)

    def mask_feature(self) -> torch.Tensor:
        return self.fc(self.mask_hidden)[0, 0]          # [H]

    @classmethod
    def from_eagle3(cls, head: Eagle3Head, embed: nn.Module, parallel_k: int, mask_token_id: int) -> "PEagleHead":
        """A P-EAGLE head carrying `head`'s weights (a fresh or warm-started EAGLE-3 head); the mask's
        embedding starts as the mean token embedding (an "average token", as kind parallel's mask row)."""
        c = head.config
        vocab = c.vocab_size
        if not 0 <= mask_token_id < vocab:
            raise DraftsmithError("drafter.mask_token_id must be an id of the target's vocabulary", mask_token_id,
                                  f"Use an id in [0, {vocab}), or null to pick an unused one")
        fields = {k: getattr(c, k) for k in c.__dataclass_fields__ if k != "draftsmith_kind"}
        config = PEagleConfig(**fields, parallel_k=parallel_k, mask_token_id=mask_token_id)
        weight = next(head.parameters())
        with torch.device(weight.device):
            out = cls(config).to(weight.dtype)
        out.load_state_dict(head.state_dict(), strict=False)
        with torch.no_grad():
            mean = embed.weight.detach().float().mean(0) * getattr(embed, "embed_scale", 1.0)   # Gemma scales
            out.mask_embedding.copy_(mean.to(weight.device, weight.dtype))
        return out


# ---------------------------------------------------------------------------------- decoding

class PEagleProposer(Eagle3Proposer):
    """k drafts from ONE head forward. `observe` only keeps the newly committed rows; `propose` reads
    them together with the k-1 mask rows in one causal forward and crops the masks from the cache.
    With a tree, a node at depth d takes its children from position d of that forward (Medusa-style,
    as ParallelProposer), so trees cost no extra forward either."""

    def __init__(self, head: PEagleHead, target_model: nn.Module):
        super().__init__(head, target_model)
        self.mask_id = head.config.mask_token_id
        # masks past the trained depth predict noise: `--k auto` drafts at most this many
        self.max_k = head.config.parallel_k
        table = head.__dict__.pop("embedding_table", None)    # a speculators folder's own embed_tokens
        self.table = None
        if table is not None:
            mine = self.embed.weight.detach()
            table = table.to(mine.device, mine.dtype)
            rows = torch.arange(len(table), device=mine.device) != self.mask_id
            if table.shape != mine.shape or not torch.equal(table[rows], mine[rows]):
                self.table = table      # it trained its embeddings: use them, as speculators does

    def reset(self) -> None:
        super().reset()
        self.pending: tuple[int, torch.Tensor, list[int]] | None = None   # (first row, features [n, H], tokens)
        self.last: torch.Tensor | None = None     # draft logits after the newest token, once read

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.embed if self.table is None else (lambda x: F.embedding(x, self.table))
        return self.head.embed(ids, table).to(self.dtype)

    @torch.inference_mode()
    def observe(self, state: DecodeState) -> None:
        """Rows hidden_start..committed-1 become final: (target taps at t, token t+1), read with the next draft."""
        start = state.hidden_start
        feats = self._fuse(state.hidden)
        tokens = state.tokens[start + 1: state.committed + 1]
        if self.pending is not None and self.pending[0] <= start <= self.pending[0] + len(self.pending[2]):
            first, old, old_tokens = self.pending        # not read yet: keep the rows before `start`
            keep = start - first
            feats, tokens, start = torch.cat([old[:keep], feats]), old_tokens[:keep] + tokens, first
        else:
            self._rollback(start)
        self.pending = (start, feats, tokens)

    @torch.inference_mode()
    def propose(self, state: DecodeState, k: int, sampler: Sampler, tree: TreeShape | None = None) -> Draft:
        k = min(k, self.max_k)
        if k < 1:
            return Draft([])
        feed = self._block(k)
        return self._drafted(k, feed, None if feed is None else self._feed(feed), sampler, tree)

    @classmethod
    @torch.inference_mode()
    def propose_rows(cls, proposers: list["PEagleProposer"], states: list[DecodeState], ks: list[int],
                     samplers: list[Sampler], tree: TreeShape | None = None) -> list[Draft]:
        """propose for several sequences: every row's block in ONE head forward (models/row_batch.py)."""
        ks = [min(k, p.max_k) for p, k in zip(proposers, ks)]
        feeds = [p._block(k) if k > 0 else None for p, k in zip(proposers, ks)]
        rows = [r for r, f in enumerate(feeds) if f is not None]
        out = dict(zip(rows, cls._feed_rows([proposers[r] for r in rows], [feeds[r] for r in rows]))) if rows else {}
        return [p._drafted(k, f, out.get(r), sampler, tree) if k > 0 else Draft([])
                for r, (p, k, f, sampler) in enumerate(zip(proposers, ks, feeds, samplers))]

    def _block(self, k: int) -> Feed | None:
        """The head's input for a draft of k: the rows committed since the last draft, then k - 1 mask rows
        (None when there is neither: the last draft's logits after the newest token still hold)."""
        empty = self.head.fc.weight.new_zeros(0, self.head.config.hidden_size)
        start, feats, tokens = self.pending or (self.length, empty, [])     # nothing new since the last draft
        masks = k - 1
        if not tokens and not masks:
            return None
        last = start + len(tokens) - 1                # the newest token's row
        inputs = torch.cat([feats.to(self.dtype), self.head.mask_feature().to(self.dtype).expand(masks, -1)])
        positions = list(range(start, last + 1)) + [last + d for d in range(1, k)]
        n = len(tokens) + masks
        see = torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(start) if n > 1 else None
        self._rollback(start)
        return Feed(inputs, tokens + [self.mask_id] * masks, start, positions, see)

    def _drafted(self, k: int, feed: Feed | None, f: torch.Tensor | None, sampler: Sampler,
                 tree: TreeShape | None) -> Draft:
        """The draft from the block's features f [n, H] (the masks leave the cache)."""
        if feed is not None:
            real = len(feed.tokens) - (k - 1)
            self._rollback(feed.start + real)             # the masks leave no trace
            self.pending = None
            if real:
                self.last = self._logits(f[real - 1])
            logits = torch.cat([self.last[None], self._logits(f[real:])])      # [k, V]
        else:
            logits = self.last[None]
        return grow_draft(lambda nodes, toks, parents: logits[[depths(parents)[i] for i in nodes]],
                          logits[0], k, sampler, tree)


# ---------------------------------------------------------------------------------- training

def _next_row(x: torch.Tensor) -> torch.Tensor:
    """Position-indexed [B, T-1, ...] -> row-indexed [B, T-1, ...]: row r holds position r+1 (zeros past the end)."""
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)


class PEagleTrainModule(nn.Module):
    """What the trainer wraps for kind `eagle3` with `parallel: true`. Every sequence's rows (depth 0)
    are followed by its kept mask elements; an element (d, a) predicts the token the row a+d does,
    against the target's distribution there restricted to the draft vocabulary (the recipe's objective,
    distill/objective.py; rows masked where the target's argmax lies outside it, as EAGLE-3's loss), a
    weighted mean over the kept rows by their depth's position weight (default: all the same,
    speculators' P-EAGLE loss). Returns the depth-0 logits on the trained positions (target vocabulary,
    -inf outside the draft one) for the held-out figures, and the loss (`owns_loss`)."""

    owns_loss = True

    def __init__(self, head: PEagleHead, target_model: nn.Module, cod_ratio: float, cod_floor: float, objective):
        super().__init__()
        self.model = head
        self.objective = objective
        self.train_stats: dict[str, float] = {}
        self._target = (target_parts(target_model),)     # a tuple: not registered, not saved
        self.target_layers = tuple(head.config.aux_layers)
        self.k = head.config.parallel_k
        self.fractions = cod_fractions(self.k, cod_ratio, cod_floor)
        self.step_stats: dict[str, float] = {}

    def forward(self, input_ids, attention_mask, mask, target_hidden, t_logits):
        head = self.model
        b, t = input_ids.shape
        rows = t - 1                                      # row r: taps at r, token r+1, predicts position r+1's p
        ids = head.draft_ids
        trained = _next_row(mask)                         # [B, R] row r has a trained target (position r+1)
        with torch.no_grad():   # the target's [N, V] logits stay as they came (bf16 under autocast): no fp32 copy
            t_arg = t_logits.argmax(-1)
            log_p = t_logits.new_zeros(b, t - 1, len(ids), dtype=torch.float32)    # the target's log p over the draft vocab
            log_p[mask] = torch.log_softmax(t_logits[:, ids].float(), dim=-1)
            learn = torch.zeros_like(mask)
            learn[mask] = head.t2d[t_arg]
            arg = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
            arg[mask] = t_arg
            label = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)   # the data's token, draft id
            label[mask] = head.to_draft(input_ids[:, 1:][mask])
            gold = None
            if self.objective.position_weights == "reach":   # p(data token) at each position, on its row
                gold = _next_row(data_token_probs(t_logits, input_ids[:, 1:][mask], mask))
            log_p, learn, arg, label = _next_row(log_p), _next_row(learn), _next_row(arg), _next_row(label)
        g = None if self.training else torch.Generator(device=mask.device).manual_seed(0)   # held-out: same draw
        blocks = gather_blocks(cod_keep(valid_anchors(trained, self.k), self.fractions, g))
        m = blocks.real.shape[1]
        table = self._target[0][0]
        embeds = head.embed(input_ids[:, 1:], lambda x: table(x).detach())                # [B, R, H]
        feats = head.fuse([x[:, :rows].to(head.fc.weight.dtype) for x in target_hidden])  # [B, R, H]
        embeds = torch.cat([embeds.to(feats.dtype), head.mask_embedding.to(feats.dtype).expand(b, m, -1)], 1)
        feats = torch.cat([feats, head.mask_feature().to(feats.dtype).expand(b, m, -1)], 1)
        positions = torch.cat([torch.arange(rows, device=feats.device).expand(b, -1), blocks.anchor + blocks.depth], 1)
        f = head(embeds, feats, positions, mask=block_attention(attention_mask[:, 1:], blocks))   # [B, R+M, H]

        batch = torch.arange(b, device=f.device)[:, None].expand(-1, m)
        where = (batch[blocks.real], (blocks.anchor + blocks.depth)[blocks.real])       # the row an element predicts as
        logits = head.logits(torch.cat([f[:, :rows][trained], f[:, rows:][blocks.real]])).float()   # [N0 + Ne, Vd]
        p = torch.cat([log_p[trained], log_p[where]])
        keep = torch.cat([learn[trained], learn[where]])
        n0 = int(trained.sum())
        depth = torch.cat([torch.zeros(n0, dtype=torch.long, device=f.device), blocks.depth[blocks.real]])
        loss_rows, alpha = self.objective.rows(p[keep], logits[keep], torch.cat([label[trained], label[where]])[keep])
        if keep.any():
            w = self._row_weights(blocks, depth, keep, alpha, gold, trained)
            loss = (w * loss_rows).sum() / w.sum().clamp_min(1e-12)
        else:   # no row to learn from: a zero that still backpropagates (and keeps DDP's buckets whole)
            loss = 0.0 * logits.sum() + 0.0 * f.sum()
        if self.training:
            self.train_stats = self.objective.stats(alpha, depth[keep], self.k)
        else:
            with torch.no_grad():
                hit = ids[logits.argmax(-1)] == torch.cat([arg[trained], arg[where]])
                self.step_stats = depth_stats(hit, depth, self.k)
        if self.training:   # nobody reads a training step's logits: skip the [N, V] scatter
            return logits[:n0], loss
        return head.to_target_logits(logits[:n0]), loss

    def _row_weights(self, blocks, depth, keep, alpha, gold, trained) -> torch.Tensor:
        """The position weight of every kept row [Nk]: by its depth (accepted_length: the batch's mean α per
        depth), reach: by its anchor's row too."""
        kept = depth[keep]
        means = torch.stack([alpha[kept == d].mean() if (kept == d).any() else alpha.new_zeros(())
                             for d in range(self.k)])                                        # [K]
        w = self.objective.along(self.k, alpha=means, gold=gold).to(kept.device)
        if w.dim() == 1:
            return w[kept]
        b = torch.arange(trained.shape[0], device=trained.device)[:, None].expand_as(blocks.anchor)
        per_row = torch.cat([w.new_ones(int(trained.sum())), w[blocks.depth, b, blocks.anchor][blocks.real]])
        return per_row[keep]
