"""The building blocks every head kind shares: a layer shape read from the target's config, RMSNorm,
rotary embedding, GQA attention, the SwiGLU MLP, save / load as config.json + model.safetensors, the
target's shared parts, and the default tapped layers.

Written out here rather than borrowed from transformers, whose layer signatures move between
releases; the weight names follow Llama's so serving formats map one to one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.errors import DraftsmithError
from draftsmith.models.checks import checked_state, config_from_dict, read_config_json


@dataclass
class LayerShape:
    """A decoder layer's shape, as the target's config gives it."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int

    @classmethod
    def from_target(cls, config, **extra):
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        heads = config.num_attention_heads
        return cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_attention_heads=heads, num_key_value_heads=getattr(config, "num_key_value_heads", heads),
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   rms_norm_eps=config.rms_norm_eps, rope_theta=float(theta), vocab_size=config.vocab_size, **extra)


def norm_weight(norm: nn.Module) -> torch.Tensor:
    """A target RMSNorm's multiplier: Gemma's norms scale by (1 + weight)."""
    w = norm.weight.detach().float()
    return w + 1 if type(norm).__name__.startswith("Gemma") else w


def default_aux_layers(num_layers: int) -> list[int]:
    """The tapped target layers (output ids, 0-based): vLLM's and SGLang's (2, N/2, N-3) before-layer ids
    as output ids; tiny targets: first, middle, last."""
    return [1, num_layers // 2 - 1, num_layers - 4] if num_layers >= 8 else [0, num_layers // 2, num_layers - 1]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_angles(positions: torch.Tensor, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, D/2] (float32) of the rotary angles at positions [B, T], for heads of size d."""
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d)
    angles = positions.float()[..., None] * inv                         # [B, T, D/2]
    return angles.cos()[:, None], angles.sin()[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split layout, as Llama in transformers) of x [B, heads, T, D] at `rope_angles`."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [B, heads, T, D] at positions [B, T]."""
    return rotate(x, *rope_angles(positions, x.shape[-1], theta))


class Attention(nn.Module):
    """GQA self-attention with RoPE. `in_features`: 2H for EAGLE-3's [embedding ; feature] input.
    `attend`, if given, replaces the plain attention (EAGLE-3's training-time-test pattern)."""

    def __init__(self, c: LayerShape, in_features: int | None = None):
        super().__init__()
        self.c = c
        n_in = in_features or c.hidden_size
        self.q_proj = nn.Linear(n_in, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(n_in, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(n_in, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, positions, cache: list | None, mask: torch.Tensor | None, attend=None):
        b, t, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope_angles(positions, c.head_dim, c.rope_theta)    # once for queries and keys
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if attend is not None:
            return self.o_proj(attend(q, k, v).transpose(1, 2).reshape(b, t, -1))
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                             is_causal=mask is None and cache is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, c: LayerShape):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HeadIO:
    """Save / load of a head as config.json (its dataclass config) + model.safetensors."""

    config_class: type = LayerShape
    optional_tensors: tuple[str, ...] = ()   # left out by some layouts; from_state refuses or fills them

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        state = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / "model.safetensors"))

    @classmethod
    def from_state(cls, config, state: dict, where: str):
        """A head from a config and a state dict; every tensor must match, or a clear error."""
        head = cls(config)
        bad = head.load_state_dict(state, strict=False)
        if bad.missing_keys or bad.unexpected_keys:
            raise DraftsmithError(f"This {config.draftsmith_kind} checkpoint does not match its config",
                                  {"missing": bad.missing_keys[:4], "unexpected": bad.unexpected_keys[:4], "in": where},
                                  "Re-export it with draftsmith export (an EAGLE-1 head has no input norm and no "
                                  "extra norms: speculators layernorms false)")
        return head

    @classmethod
    def from_pretrained(cls, path: str | Path, target=None):
        """A head from a draftsmith folder. config.json is read strictly and checked against `target`
        (a models.checks.TargetShape, or a layer count) and the weights' shapes against the config
        before the head is built: a hostile folder cannot make it allocate what it declares."""
        path = Path(path)
        config = config_from_dict(cls.config_class, read_config_json(path), str(path))
        return cls.from_state(config, checked_state(cls, config, path, target), str(path))


def target_parts(target_model: nn.Module):
    """(embedding, final norm, LM head) of a transformers causal LM: what the head shares."""
    base = getattr(target_model, target_model.base_model_prefix)
    return target_model.get_input_embeddings(), base.norm, target_model.get_output_embeddings()
