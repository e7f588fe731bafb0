"""Kind `eagle`: an EAGLE-1/2 feature head (Li et al. 2401.15077).

EAGLE-1's own layout, which vLLM and SGLang serve: input row t = [the target's embedding of token
t+1 ; the target's final hidden state at t, AFTER its final norm (what its LM head reads)] -> fc
(2H -> H, with bias) -> one Llama-style decoder layer without an input norm -> feature f_t, a
prediction of the target's normed hidden state at t+1. Its token distribution is the target's LM
head applied to f_t directly (frozen, shared, never saved with the head). Drafting feeds f_t back
in as the hidden state of the next row. The head taps the target's last layer and applies the
target's final norm itself (a pointwise function of that output).

The decoder layer is built from models/layers.py (RMSNorm, RoPE, GQA attention, SwiGLU MLP; its own
small KV cache); the weight names follow Llama's so serving formats map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.models.layers import MLP, Attention, HeadIO, LayerShape, RMSNorm, target_parts
from draftsmith.models.target import target_signals
from draftsmith.models.row_batch import Feed, pack, unpack
from draftsmith.protocol.drafting import Draft, TreeShape, grow_draft, grow_rows
from draftsmith.protocol.proposer import DecodeState, Sampler
from draftsmith.protocol.tree import depths


@dataclass
class EagleConfig(LayerShape):
    feature_scale: float = 1.0          # fixed scale the feature loss and input noise use
    target_layer: int = -1              # target layer whose output the head reads (-1: last)
    draftsmith_kind: str = "eagle"


class DecoderLayer(nn.Module):
    """EAGLE-1's layer: Llama's, without the input norm (its input is fc's output)."""

    def __init__(self, c: EagleConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, positions, cache=None, mask=None):
        x = x + self.self_attn(x, positions, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class EagleHead(HeadIO, nn.Module):
    """The trainable part: fc + one decoder layer. Embeddings, final norm and LM head stay the target's."""

    config_class = EagleConfig
    input_is_normed = True    # reads the target's hidden state after its final norm

    def __init__(self, config: EagleConfig):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=True)
        self.layers = nn.ModuleList([DecoderLayer(config)])

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                cache: list | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """embeds, hidden: [B, T, H] (embedding of token t+1, target's normed hidden at t) -> features [B, T, H]."""
        x = self.fc(torch.cat([embeds, hidden], dim=-1))
        return self.layers[0](x, positions, cache, mask)

def build_eagle(target_model: nn.Module, feature_scale: float) -> EagleHead:
    """A fresh head for `target_model`: its decoder layer copied from the target's last layer, the
    branch outputs zeroed, so it starts as the pass-through of the target's normed state."""
    head = EagleHead(EagleConfig.from_target(target_model.config, feature_scale=feature_scale))
    base = getattr(target_model, target_model.base_model_prefix)
    last = base.layers[-1].state_dict()
    head.layers[0].load_state_dict({k: v for k, v in last.items() if k in head.layers[0].state_dict()}, strict=False)
    with torch.no_grad():   # start as "ignore the token, pass the hidden state through"
        h = head.config.hidden_size
        head.fc.weight.zero_()
        head.fc.weight[:, h:] = torch.eye(h)
        head.fc.bias.zero_()
        # the copied branches were sized for the target's raw residual stream (std ~36 in SmolLM2),
        # the head's stream is the normed state (std ~2): zero the branch outputs so the fresh head
        # is exactly the pass-through, and let training grow them
        head.layers[0].self_attn.o_proj.weight.zero_()
        head.layers[0].mlp.down_proj.weight.zero_()
    return head.to(next(target_model.parameters()).dtype)


class EagleProposer:
    """Drafting with an EAGLE head inside the built-in decoder (chain drafting)."""

    def __init__(self, head: EagleHead, target_model: nn.Module):
        self.head = head.eval().requires_grad_(False)
        self.embed, self.norm, self.lm_head = target_parts(target_model)
        self.hidden_layers = (head.config.target_layer,)
        self.device = next(target_model.parameters()).device
        self.dtype = next(target_model.parameters()).dtype
        self.head.to(device=self.device, dtype=self.dtype)

    def reset(self) -> None:
        self.cache: list = []
        self.length = 0           # rows in the cache
        self.feature = None       # f for the last committed row: predicts the token after the newest

    def _feed(self, feed: Feed) -> torch.Tensor:
        """Append rows (token embedding, feature) after the `feed.start` cached rows (models/row_batch.py)."""
        hidden, tokens, start, positions, mask = feed
        ids = torch.tensor([tokens], device=self.device)
        if positions is None:
            positions = list(range(start, start + len(tokens)))
            if len(tokens) > 1:
                mask = torch.ones(len(tokens), start + len(tokens), dtype=torch.bool, device=self.device).tril(start)
        pos = torch.tensor([positions], device=self.device)
        f = self.head(self._embed(ids), hidden[None].to(self.dtype), pos, self.cache, mask)
        self.length = start + len(tokens)
        return f[0]               # [T, H]

    @staticmethod
    def _feed_rows(proposers: list["EagleProposer"], feeds: list[Feed]) -> list[torch.Tensor]:
        """_feed for several sequences (forks of one proposer) in ONE head forward; features [T_r, H] per row."""
        if len(proposers) == 1:
            return [proposers[0]._feed(feeds[0])]
        one = proposers[0]
        packed = pack([p.cache for p in proposers], feeds)
        f = one.head(one._embed(packed.ids), packed.hidden.to(one.dtype), packed.positions, packed.cache, packed.mask)
        for p, cache, feed in zip(proposers, unpack(packed, [p.cache for p in proposers]), feeds):
            p.cache, p.length = cache, feed.start + len(feed.tokens)
        return [f[r, :t] for r, t in enumerate(packed.counts)]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).to(self.dtype)

    def _rollback(self, length: int) -> None:
        if self.cache and self.length > length:
            self.cache[:] = [t[:, :, :length] for t in self.cache]
        self.length = min(self.length, length)

    def _observed(self, state: DecodeState) -> Feed:
        """Rows hidden_start..committed-1 become final: (target hidden at t, token t+1)."""
        self._rollback(state.hidden_start)   # drop the rows drafted speculatively
        start, end = state.hidden_start, state.committed
        return Feed(self._fuse(state.hidden), state.tokens[start + 1: end + 1], start)

    @torch.inference_mode()
    def observe(self, state: DecodeState) -> None:
        self.feature = self._feed(self._observed(state))[-1]

    @classmethod
    @torch.inference_mode()
    def observe_rows(cls, proposers: list["EagleProposer"], states: list[DecodeState]) -> None:
        """observe for several sequences in one head forward (protocol/proposer.py, observe_all)."""
        feeds = [p._observed(s) for p, s in zip(proposers, states)]
        for p, f in zip(proposers, cls._feed_rows(proposers, feeds)):
            p.feature = f[-1]

    def _fuse(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """The target's tapped hidden states [n, H] per layer -> the head's input feature [n, H]:
        for EAGLE-1, the last layer's output through the target's final norm."""
        return self.norm(hidden[0].to(self.dtype))

    def _logits(self, feature: torch.Tensor) -> torch.Tensor:
        """Features [..., H] -> draft logits [..., V]."""
        return self.lm_head(feature).float()

    @torch.inference_mode()
    def propose(self, state: DecodeState, k: int, sampler: Sampler, tree: TreeShape | None = None) -> Draft:
        """A chain or tree of drafts (protocol/drafting.py). A node's row reads its token and the feature
        its parent's row produced; its output feature gives the logits of its children."""
        growth = _Growth(self)

        def expand(nodes: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            return self._logits(growth.read(nodes, self._feed(growth.feed(nodes, tokens, parents))))

        return grow_draft(expand, self._logits(self.feature), k, sampler, tree)

    @classmethod
    @torch.inference_mode()
    def propose_rows(cls, proposers: list["EagleProposer"], states: list[DecodeState], ks: list[int],
                     samplers: list[Sampler], tree: TreeShape | None = None) -> list[Draft]:
        """propose for several sequences: every drafting round is ONE head forward and one LM-head call over
        all rows still drafting (protocol/drafting.py, grow_rows)."""
        one = proposers[0]
        growths = [_Growth(p) for p in proposers]

        def expand_rows(requests: dict) -> dict:
            rows = list(requests)
            feats = cls._feed_rows([proposers[r] for r in rows],
                                   [growths[r].feed(*requests[r]) for r in rows])
            feats = [growths[r].read(requests[r][0], f) for r, f in zip(rows, feats)]
            logits = one._logits(torch.cat(feats)).split([len(f) for f in feats])
            return dict(zip(rows, logits))

        roots = one._logits(torch.stack([p.feature for p in proposers])).unbind(0)
        return grow_rows(expand_rows, list(roots), ks, samplers, tree)


class _Growth:
    """One sequence's draft in progress: the cache row each drafted node's feature came from. A node's row
    reads its token and the feature its parent's row produced, and sees the committed rows and its ancestors."""

    def __init__(self, proposer: EagleProposer):
        self.proposer = proposer
        self.base = proposer.length
        self.feats: dict[int, torch.Tensor] = {}     # node -> the feature its row produced
        self.rows: dict[int, int] = {}               # node -> its row in the head's cache

    def feed(self, nodes: list[int], tokens: list[int], parents: list[int]) -> Feed:
        p, base = self.proposer, self.base
        cached = p.length
        depth = depths(parents)
        see = torch.zeros(len(nodes), cached + len(nodes), dtype=torch.bool, device=p.device)
        see[:, :base] = True
        for r, node in enumerate(nodes):
            parent = parents[node]
            while parent >= 0:
                see[r, self.rows[parent]] = True
                parent = parents[parent]
            see[r, cached + r] = True
            self.rows[node] = cached + r
        inputs = torch.stack([p.feature if parents[n] < 0 else self.feats[parents[n]] for n in nodes])
        return Feed(inputs, [tokens[n] for n in nodes], cached, [base - 1 + depth[n] for n in nodes], see)

    def read(self, nodes: list[int], features: torch.Tensor) -> torch.Tensor:
        self.feats.update(zip(nodes, features))
        return features


class EagleTrainModule(nn.Module):
    """What the trainer wraps for kind `eagle`. Row t reads (embedding of token t+1, the target's
    normed hidden h_t + noise) and predicts h_{t+1} (SmoothL1 on features / feature_scale, weight
    `feature_weight`) and, through the target's LM head, the token t+2: trained position j = t+1 of
    the shared mask. The target's parts are held outside the module's parameters."""

    def __init__(self, head: EagleHead, target_model: nn.Module, feature_weight: float, noise: float):
        super().__init__()
        self.model = head
        self.target_layers = (head.config.target_layer,)
        self._target = (target_parts(target_model),)   # a tuple: not registered, not saved
        self.feature_weight = feature_weight
        self.noise = noise

    def forward(self, input_ids, attention_mask, mask, target_hidden, t_logits=None):
        embed, norm, lm_head = self._target[0]
        scale = self.model.config.feature_scale
        with torch.no_grad():
            target_hidden = norm(target_hidden[0])                            # what the target's head reads
            embeds = embed(input_ids[:, 1:])                                  # [B, T-1, H] token t+1
        hidden = target_hidden[:, :-1]                                        # [B, T-1, H] h_t
        if self.training and self.noise:
            hidden = hidden + (torch.rand_like(hidden) * 2 - 1) * (self.noise * scale)
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
        features = self.model(embeds.to(hidden.dtype), hidden, positions)     # [B, T-1, H]
        rows = mask[:, 1:]                                                    # row t <-> position t+1
        predicted = features[:, :-1][rows]                                   # [N, H]
        logits = lm_head(predicted)                                           # [N, V]
        wanted = target_hidden[:, 1:-1][rows]                                 # h_{t+1}
        aux = F.smooth_l1_loss(predicted.float() / scale, wanted.float() / scale) if len(wanted) else logits.sum() * 0
        return logits, self.feature_weight * aux


def feature_scale(target_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """The std of the target's final (normed) hidden states on a batch: the feature loss and the
    input noise are taken relative to it."""
    mask = torch.zeros_like(attention_mask[:, 1:], dtype=torch.bool)
    _, hidden = target_signals(target_model, input_ids, attention_mask, mask, layers=(-1,))
    with torch.no_grad():
        normed = target_parts(target_model)[1](hidden[0])
    return float(normed[attention_mask.bool()].float().std())
