"""Kind `eagle3`: an EAGLE-3 head (Li et al. 2503.01840).

Input row t: fc([h_low ; h_mid ; h_high] at t) (3H -> H), the fused target feature, beside the
target's (frozen, shared) embedding of token t+1. One decoder layer reads [input_layernorm(embedding)
; hidden_norm(feature)] (2H -> attention) with the feature as its residual; its output f_t goes
through the head's own norm and its own LM head over a reduced draft vocabulary of Vd tokens.
Drafting feeds f_t back in as the feature of the next row (no fc: it is already H wide).

Vocabulary maps d2t / t2d: models/draft_vocab.py (saved with every checkpoint, refused if missing).

Layer convention: `aux_layers` are 0-based indices of target decoder layers whose OUTPUT is read
(transformers' hidden_states[i + 1]; SGLang's eagle_config ids). vLLM / speculators count the
residual stream entering layer i, i.e. these ids + 1. Default: (1, N/2 - 1, N - 4), which is
vLLM's and SGLang's default (2, N/2, N - 3) in their convention.

Training-time test: the head is unrolled `ttt_steps` times over a whole sequence; step i >= 1 reads
its own features of step i-1 and the data token t+1+i at position t+i, and attends to the
teacher-forced rows <= t of step 0 plus its own rows t of steps 1..i — exactly what it sees when
drafting i tokens past an accepted prefix ending at t.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.errors import DraftsmithError
from draftsmith.metric_modules.acceptance.acceptance_figures import tau_from_alphas
from draftsmith.models.eagle import EagleConfig, EagleProposer
from draftsmith.models.draft_vocab import DraftVocab
from draftsmith.models.layers import MLP, Attention, HeadIO, RMSNorm, default_aux_layers, norm_weight, target_parts
from draftsmith.models.target import data_token_probs


@dataclass
class Eagle3Config(EagleConfig):
    draft_vocab_size: int = 0
    aux_layers: list[int] = field(default_factory=list)   # target layer outputs read, see the module doc
    target_hidden_size: int = 0
    norm_before_residual: bool = False
    layer_convention: str = "output of target decoder layer i, 0-based (transformers hidden_states[i + 1])"
    draftsmith_kind: str = "eagle3"


class Eagle3Layer(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.norm_before_residual = c.norm_before_residual
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, in_features=2 * c.hidden_size)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, embeds, hidden, positions, cache=None, mask=None, attend=None):
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        x = residual + self.self_attn(x, positions, cache, mask, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Head(DraftVocab, HeadIO, nn.Module):
    """fc + one decoder layer + norm + draft LM head, with the d2t / t2d maps as buffers (models/draft_vocab.py)."""

    config_class = Eagle3Config

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(3 * (config.target_hidden_size or config.hidden_size), config.hidden_size, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(config)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self._init_vocab()

    def fuse(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat(hidden, dim=-1))

    def forward(self, embeds, hidden, positions, cache=None, mask=None, attend=None) -> torch.Tensor:
        """embeds [B, T, H] (token t+1), hidden [B, T, H] (fused target feature or own feature) -> f [B, T, H]."""
        return self.layers[0](embeds, hidden, positions, cache, mask, attend)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(features))     # [..., Vd]


# ---------------------------------------------------------------------------------- building

def build_eagle3(target_model: nn.Module, aux_layers: list[int], draft_ids: torch.Tensor,
                 init: str = "target") -> Eagle3Head:
    """A fresh head. init=target: the decoder layer's feature half, attention output and MLP copied
    from the target's last layer (Llama-style targets), norm and LM-head rows from the target's
    (draft vocabulary rows), fc passing the highest tapped layer through; init=random: PyTorch's
    default init."""
    cfg = target_model.config
    n = cfg.num_hidden_layers
    bad = [i for i in aux_layers if not 0 <= i < n]
    if len(aux_layers) != 3 or bad:
        raise DraftsmithError("drafter.aux_layers must be 3 target layer indices in [0, num_layers)",
                              aux_layers, f"This target has {n} layers; null picks {default_aux_layers(n)}")
    c = Eagle3Config.from_target(cfg, draft_vocab_size=len(draft_ids), aux_layers=list(aux_layers),
                                 target_hidden_size=cfg.hidden_size)
    head = Eagle3Head(c)
    head.set_vocab(draft_ids)
    if init == "target":
        _, norm, lm_head = target_parts(target_model)
        last = getattr(target_model, target_model.base_model_prefix).layers[-1]
        layer, h = head.layers[0], c.hidden_size
        # the decoder layer is copied only from a Llama-style (SwiGLU, pre-norm) layer; others
        # (Gemma: GELU, sandwich norms) keep a random layer and still share norm and LM-head rows
        llama_like = getattr(cfg, "hidden_act", None) == "silu" and not hasattr(last, "pre_feedforward_layernorm")
        with torch.no_grad():
            src = dict(last.named_parameters()) if llama_like else {}
            for name, p in layer.named_parameters():
                if name in src and src[name].shape == p.shape and "norm" not in name:
                    p.copy_(src[name])
                elif name in src and p.shape[-1] == 2 * h and src[name].shape[-1] == h:
                    p[:, h:] = src[name]                      # q/k/v: the feature half from the target
                    p[:, :h] *= 0.1
            for mine, theirs in (("input_layernorm", "input_layernorm"), ("hidden_norm", "input_layernorm"),
                                 ("post_attention_layernorm", "post_attention_layernorm")):
                if llama_like:
                    getattr(layer, mine).weight.copy_(norm_weight(getattr(last, theirs)))
            head.norm.weight.copy_(norm_weight(norm))
            head.lm_head.weight.copy_(lm_head.weight[draft_ids.to(lm_head.weight.device)])
            head.fc.weight.zero_()
            head.fc.weight[:, 2 * cfg.hidden_size:] = torch.eye(h, cfg.hidden_size)
    return head.to(next(target_model.parameters()).dtype)


# ---------------------------------------------------------------------------------- decoding

class Eagle3Proposer(EagleProposer):
    """Chain drafting with an EAGLE-3 head: the decoder state and rollback are EAGLE's; the head reads
    three tapped layers through fc and scores only its draft vocabulary (-inf elsewhere)."""

    def __init__(self, head: Eagle3Head, target_model: nn.Module):
        super().__init__(head, target_model)
        self.hidden_layers = tuple(head.config.aux_layers)

    def _fuse(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        return self.head.fuse([h.to(self.dtype) for h in hidden])

    def _logits(self, feature: torch.Tensor) -> torch.Tensor:
        return self.head.to_target_logits(self.head.logits(feature).float())


# ---------------------------------------------------------------------------------- training

def ttt_attention(past: list):
    """The attention of one training-time-test step. `past` holds (k, v) of the earlier steps; row
    t attends to step 0's rows <= t (causal) and to row t of every later step, itself included."""

    def attend(q, k, v):
        past.append((k, v))
        if len(past) == 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k0, v0 = (x.repeat_interleave(rep, 1) for x in past[0])
        ks = torch.stack([x.repeat_interleave(rep, 1) for x, _ in past[1:]], dim=-2)   # [B, h, T, i, D]
        vs = torch.stack([x.repeat_interleave(rep, 1) for _, x in past[1:]], dim=-2)
        scale = q.shape[-1] ** -0.5
        t = q.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        s0 = (q @ k0.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))   # [B, h, T, T]
        sd = (q[..., None, :] * ks).sum(-1) * scale                                     # [B, h, T, i]
        w = torch.softmax(torch.cat([s0, sd], dim=-1).float(), dim=-1).to(q.dtype)
        return w[..., :t] @ v0 + (w[..., t:, None] * vs).sum(-2)
    return attend


PREP_ROWS = 128
"""Target rows per slice when the training step restricts the target's logits to the draft vocabulary."""


class Eagle3TrainModule(nn.Module):
    """What the trainer wraps for kind `eagle3`. Step i (0..ttt_steps-1), row t: predicts token t+2+i
    against the target's distribution at position t+1+i restricted (renormalised) to the draft
    vocabulary, rows masked where the target's argmax lies outside the draft vocabulary. The loss is the
    recipe's objective (handed in by the trainer, distill/objective.py) per row, step i weighed by its
    position weight (default: decay**i, EAGLE-3's). Returns step 0's logits on the shared trained
    positions (in eval mode mapped to the target vocabulary, -inf outside the draft one, for the held-out
    metrics; in training the draft-vocabulary rows, which nobody reads) and the loss."""

    owns_loss = True

    def __init__(self, head: Eagle3Head, target_model: nn.Module, ttt_steps: int, decay: float, objective):
        super().__init__()
        self.model = head
        self._target = (target_parts(target_model),)     # a tuple: not registered, not saved
        self.target_layers = tuple(head.config.aux_layers)
        self.ttt_steps, self.decay, self.objective = ttt_steps, decay, objective
        self.step_stats: dict[str, float] = {}
        self.train_stats: dict[str, float] = {}

    def forward(self, input_ids, attention_mask, mask, target_hidden, t_logits):
        head = self.model
        embed = self._target[0][0]
        b, t = input_ids.shape
        rows = t - 1                                                          # row r: hidden at r, token r+1
        ids = head.draft_ids
        with torch.no_grad():   # the target's [N, V] logits stay as they came (bf16 under autocast): no fp32 copy
            t_arg = t_logits.argmax(-1)
            grid_p = t_logits.new_zeros(b, rows, len(ids), dtype=torch.float32)   # target log p, draft vocab
            where = mask.nonzero(as_tuple=True)
            for start in range(0, len(t_logits), PREP_ROWS):    # one slice size recurs: no batch-sized temporaries
                part = slice(start, start + PREP_ROWS)
                grid_p[where[0][part], where[1][part]] = torch.log_softmax(t_logits[part][:, ids].float(), dim=-1)
            valid = torch.zeros_like(mask)
            valid[mask] = head.t2d[t_arg]
            arg = torch.full_like(input_ids[:, 1:], -1)
            arg[mask] = t_arg
            labels = head.to_draft(input_ids[:, 1:])                          # [B, R] data token, draft id
            gold = None
            if self.objective.position_weights == "reach":   # p(data token) at position r + 1, on row r
                g = data_token_probs(t_logits, input_ids[:, 1:][mask], mask)
                gold = torch.cat([g[:, 1:], g[:, :1] * 0], dim=1)
            embeds = embed(input_ids).detach()
        past: list = []
        steps, stats = [], {}
        step0 = torch.zeros((0, len(ids)), device=ids.device)
        for i, h in enumerate(self.unroll(embeds, target_hidden, past)):
            n = rows - 1 - i                                                  # rows with a target at t+1+i
            logits = head.logits(h[:, :n])              # [B, n, Vd], bf16 under autocast: the loss upcasts
            p, v, m = grid_p[:, 1 + i:], valid[:, 1 + i:], mask[:, 1 + i:]
            loss_rows, alpha = self.objective.rows(p, logits[v], labels[:, 1 + i:][v], keep=v)
            # no row to learn from: a zero that still backpropagates (and keeps DDP's buckets whole);
            # the step's full [B, n, Vd] logits are not kept past this step
            steps.append((v, loss_rows if v.any() else 0.0 * logits.sum(), alpha))
            with torch.no_grad():
                hit = (ids[logits.argmax(-1)] == arg[:, 1 + i:])[m].float()
                rate = float(hit.mean()) if hit.numel() else float("nan")
                stats[f"ttt_greedy_match_step{i}"] = rate
            if i == 0 and not self.training:
                step0 = logits[mask[:, 1:]].float()
        rates = [stats[f"ttt_greedy_match_step{i}"] for i in range(min(4, len(steps)))]
        stats["ttt_tau_greedy_k4"] = tau_from_alphas([None if r != r else r for r in rates])
        self.step_stats = stats
        loss = self._weighted(steps, b, rows, gold) if steps else torch.zeros((), device=ids.device)
        if self.training and steps:
            self.train_stats = self.objective.stats(
                torch.cat([a for _, _, a in steps]),
                torch.cat([torch.full((len(a),), i, device=a.device) for i, (_, _, a) in enumerate(steps)]),
                len(steps))
        if self.training:   # nobody reads a training step's logits: no [N, Vd] copy, no [N, V] scatter (200 MB on SmolLM2)
            return step0, loss
        return head.to_target_logits(step0), loss

    def _weighted(self, steps: list, b: int, rows: int, gold: torch.Tensor | None) -> torch.Tensor:
        """Σ_i mean over step i's rows of w_i · loss_i; w from the objective's position weights (per row
        for reach and accepted_length), default decay**i."""
        count = len(steps)
        grid = None
        if self.objective.position_weights == "accepted_length":
            grid = torch.zeros(count, b, rows, device=steps[0][1].device)   # α of step i at row t, 0 where unknown
            for i, (v, _, alpha) in enumerate(steps):
                grid[i, :, : v.shape[1]][v] = alpha
        default = torch.tensor([self.decay ** i for i in range(count)])
        w = self.objective.along(count, default, alpha=grid, gold=gold)
        loss = steps[0][1].new_zeros(())
        for i, (v, loss_rows, _) in enumerate(steps):
            if not v.any():
                loss = loss + loss_rows
                continue
            wi = w[i].to(loss_rows.device) if w.dim() == 1 else w[i, :, : v.shape[1]].to(loss_rows.device)[v]
            loss = loss + (wi * loss_rows).mean()
        return loss

    def unroll(self, embeds: torch.Tensor, target_hidden: list[torch.Tensor], past: list):
        """Yield the head's features [B, T-1, H] of each training-time-test step. embeds: the target's
        embeddings of the sequence [B, T, H]; target_hidden: the tapped layers, [B, T, H] each."""
        head = self.model
        b, t, _ = embeds.shape
        rows = t - 1
        h = head.fuse([x[:, :rows].to(head.fc.weight.dtype) for x in target_hidden])   # [B, R, H]
        for i in range(min(self.ttt_steps, rows - 1)):
            emb = F.pad(embeds[:, 1 + i:], (0, 0, 0, i))                      # token t+1+i, zero past the end
            positions = (torch.arange(rows, device=h.device) + i)[None].expand(b, -1)
            h = head(emb.to(h.dtype), h, positions, attend=ttt_attention(past))
            yield h
