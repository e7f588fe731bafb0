"""Kind `dflash` (DFlash, Chen et al. 2602.06036): a block drafter (models/block_drafter.py) whose anchor
slot drafts nothing — the block [x_n, mask x (B-1)] drafts x_{n+1}..x_{n+B-1} in one forward — as
vLLM speculators' `dflash` type (sample_from_anchor false)."""

from __future__ import annotations

from dataclasses import dataclass

from draftsmith.models.block_drafter import BlockConfig, BlockHead


@dataclass
class DFlashConfig(BlockConfig):
    sample_from_anchor: bool = False
    draftsmith_kind: str = "dflash"


class DFlashHead(BlockHead):
    config_class = DFlashConfig
