"""The mask blocks of parallel drafting, shared by kind `parallel` (PARD, An et al. 2504.18583) and
kind `eagle3` with `parallel: true` (P-EAGLE): drafting reads [x_0..x_n, m, .., m], and training builds
every such situation of a sequence in one forward by appending its mask blocks.

Rows 0..R-1 are the sequence's positions that predict something (depth 0). The element (d, a) of
block d (d = 1..K-1) stands for the mask at depth d after the anchor row a (the last committed row):
position id a+d, attending to rows 0..a and to the elements (1..d, a) — exactly what the mask sees
when drafting. It exists when rows a..a+d are all trained (drafting continues the target's answer).

Conditional drop-token (COD, PARD): depth 0 is kept whole; each anchor draws u ~ U(0, 1) once and is
kept at depth d while u < max(cod_ratio**d, cod_floor). One draw per anchor keeps the blocks nested
(an element kept at depth d still finds its masks at depths < d), and the expected share of depth d
kept is that fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftsmith.metric_modules.acceptance.acceptance_figures import tau_from_alphas


def cod_fractions(k: int, ratio: float, floor: float) -> list[float]:
    """Share kept of depths 0..k-1: 1 at depth 0, max(ratio**d, floor) below."""
    return [1.0] + [max(ratio ** d, floor) for d in range(1, k)]


def valid_anchors(mask: torch.Tensor, k: int) -> list[torch.Tensor]:
    """valid[d] [B, R]: the element (d, a) exists (positions a..a+d are all trained), d = 0..k-1."""
    valid = [mask]
    for d in range(1, k):
        nxt = torch.zeros_like(mask)
        nxt[:, : mask.shape[1] - d] = valid[-1][:, : mask.shape[1] - d] & mask[:, d:]
        valid.append(nxt)
    return valid


def cod_keep(valid: list[torch.Tensor], fractions: list[float], generator: torch.Generator | None = None):
    """kept[d] [B, R] for depths 1..k-1 (index d-1): one uniform per anchor, kept while u < fraction."""
    u = torch.rand(valid[0].shape, device=valid[0].device, generator=generator)
    return [valid[d] & (u < fractions[d]) for d in range(1, len(valid))]


@dataclass
class MaskBlocks:
    """The kept elements of the mask blocks, padded to M per row."""

    depth: torch.Tensor     # [B, M] depth d >= 1 (0 on padding)
    anchor: torch.Tensor    # [B, M] anchor a
    real: torch.Tensor      # [B, M] bool, False on padding


def gather_blocks(kept: list[torch.Tensor]) -> MaskBlocks:
    """Flatten the kept elements of every depth into [B, M] (depth-major, then anchor order)."""
    if len(kept) == 0:     # k = 1: no mask blocks
        empty = torch.zeros(0, 0, dtype=torch.long)
        return MaskBlocks(empty, empty, empty.bool())
    b, r = kept[0].shape
    device = kept[0].device
    flat = torch.cat(kept, dim=1)                                                   # [B, (K-1) R]
    depth = torch.arange(1, len(kept) + 1, device=device).repeat_interleave(r).expand(b, -1)
    anchor = torch.arange(r, device=device).repeat(len(kept)).expand(b, -1)
    m = int(flat.sum(1).max()) if flat.numel() else 0
    order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :m]      # kept first, in order
    real = flat.gather(1, order)
    return MaskBlocks(depth.gather(1, order) * real, anchor.gather(1, order) * real, real)


def block_attention(attention: torch.Tensor, blocks: MaskBlocks) -> torch.Tensor:
    """[B, 1, T+M, T+M] bool (True = attend) for the sequence followed by its mask blocks."""
    b, t = attention.shape
    m = blocks.real.shape[1]
    device = attention.device
    pos = torch.arange(t, device=device)
    full = torch.zeros(b, t + m, t + m, dtype=torch.bool, device=device)
    full[:, :t, :t] = (pos[None, :] <= pos[:, None])[None] & attention.bool()[:, None, :]
    full[:, t:, :t] = (pos[None, None, :] <= blocks.anchor[:, :, None]) & blocks.real[:, :, None]
    same = (blocks.anchor[:, :, None] == blocks.anchor[:, None, :]) & (blocks.depth[:, None, :] <= blocks.depth[:, :, None])
    both = blocks.real[:, :, None] & blocks.real[:, None, :]
    full[:, t:, t:] = (same & both) | torch.eye(m, dtype=torch.bool, device=device)   # padding sees itself only
    return full[:, None]


def depth_stats(hit: torch.Tensor, depth: torch.Tensor, k: int) -> dict[str, float]:
    """Greedy agreement with the target per depth (hit [N] bool, depth [N] of each row), and the chain
    tau(k=K) those rates predict: what the held-out evaluation logs for parallel drafters."""
    stats = {}
    for d in range(k):
        rows = depth == d
        stats[f"parallel_greedy_match_depth{d}"] = float(hit[rows].float().mean()) if rows.any() else float("nan")
    rates = [stats[f"parallel_greedy_match_depth{d}"] for d in range(k)]
    stats[f"parallel_tau_greedy_k{k}"] = tau_from_alphas([None if r != r else r for r in rates])
    return stats
