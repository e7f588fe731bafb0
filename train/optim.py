"""The optimizer a recipe names (`train.optimizer`): AdamW, or Muon for the hidden weight matrices
beside AdamW for the rest (Jordan et al.'s Muon, torch.optim.Muon; vLLM speculators' default).

Muon orthogonalises a matrix's momentum update (Newton-Schulz), which is defined for 2-D weights of
hidden layers only: embeddings and LM heads (a row per token), norms and biases stay with AdamW.
Both optimizers step together behind one param_groups list, so one LR schedule scales both, each
group from its own peak (train.lr for AdamW, train.muon_lr for Muon).
"""

from __future__ import annotations

import torch
from torch import nn

_ADAMW_MATRICES = ("embed", "lm_head", "mask_embedding")
"""Names of 2-D parameters that index tokens: they stay with AdamW under Muon."""


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """A hidden 2-D weight matrix (Muon's); everything else trains with AdamW."""
    return p.ndim == 2 and not any(part in name for part in _ADAMW_MATRICES)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer: their groups in one list, step/zero_grad/state_dict on both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.parts = (muon, adamw)
        params = [p for part in self.parts for g in part.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = muon.param_groups + adamw.param_groups   # the same dicts: the schedule reaches both

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.parts[0].state_dict(), "adamw": self.parts[1].state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.parts[0].load_state_dict(state_dict["muon"])
        self.parts[1].load_state_dict(state_dict["adamw"])


def build_optimizer(module: nn.Module, t) -> torch.optim.Optimizer:
    """The optimizer of the trainable parameters of `module` for the recipe's `train` section `t`.
    Weight decay applies to matrices only (never to norms and biases)."""
    muon, decay, no_decay = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if t.optimizer == "muon" and is_muon_param(name, p):
            muon.append(p)
        else:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    if t.optimizer == "adamw" or not muon:
        return adamw
    return MuonWithAdamW(torch.optim.Muon(muon, lr=t.muon_lr, weight_decay=t.weight_decay), adamw)
