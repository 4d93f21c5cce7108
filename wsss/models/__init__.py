"""Backbones, co-attention and the co-attention classifier (METHOD.md sec. 1)."""

from wsss.models.backbones import BACKBONES, build_backbone
from wsss.models.classifier import CoAttentionClassifier
from wsss.models.coattention import LearnableCoAttention, co_attention

__all__ = ["BACKBONES", "build_backbone", "CoAttentionClassifier",
           "LearnableCoAttention", "co_attention"]
