"""KV injection (DFlash, 2602.06036): a draft layer whose attention reads the target's context
features as extra keys and values, projected by the layer's own k_proj / v_proj.

The layer is speculators' Qwen3DFlashDecoderLayer (the tensor names match): pre-norm, attention with
a per-head RMSNorm on queries and keys (q_norm, k_norm; RoPE after the norm), SwiGLU MLP. The
context's keys and values depend only on the context features and their positions, never on the
block, so a decoder computes them once per committed position (`project_kv`) and keeps them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.models.layers import MLP, LayerShape, RMSNorm, rope


class InjectedAttention(nn.Module):
    def __init__(self, c: LayerShape):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def project_kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv heads, L, head dim] of x [B, L, H] at positions [B, L]."""
        b, n, _ = x.shape
        c = self.c
        k = self.k_norm(self.k_proj(x).view(b, n, c.num_key_value_heads, c.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        return rope(k, positions, c.rope_theta), v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, Q, H] (the block) attends to the context's (k, v) and to itself; mask [B, 1, Q, L + Q] bool
        (None: all of it)."""
        b, q_len, _ = x.shape
        c = self.c
        q = self.q_norm(self.q_proj(x).view(b, q_len, c.num_attention_heads, c.head_dim)).transpose(1, 2)
        q = rope(q, positions, c.rope_theta)
        k, v = self.project_kv(x, positions)
        k, v = torch.cat([context[0], k], 2), torch.cat([context[1], v], 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


class InjectedLayer(nn.Module):
    def __init__(self, c: LayerShape):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = InjectedAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, positions, context, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, context, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
