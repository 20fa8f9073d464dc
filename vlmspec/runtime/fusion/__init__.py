"""Fusion styles, one file per style; importing this package registers every fusion builder."""

from vlmspec.runtime.fusion.base import Fusion
from vlmspec.runtime.fusion.cross_attention import CrossAttentionFusion
from vlmspec.runtime.fusion.moe import MoEFusionModule
from vlmspec.runtime.fusion.prefix import PrefixFusion
from vlmspec.runtime.fusion.visual_expert import VisualExpertFusion

__all__ = ["CrossAttentionFusion", "Fusion", "MoEFusionModule", "PrefixFusion", "VisualExpertFusion"]
