"""Evaluation metrics: panoptic quality (COCO panoptic API), semantic mIoU (detectron2), mask AP (COCOeval).

Each metric is an accumulator with `update` (one image), `merge` (another shard, exact), `state_dict` /
`from_state_dict` (plain JSON, to send between workers) and `result() -> dict` (fractions, 0-1).
"""
from __future__ import annotations

from .instance import InstanceAccumulator
from .panoptic import PanopticAccumulator, load_panoptic_png, pq_compute
from .semantic import SemanticAccumulator, semantic_compute

__all__ = [
    "InstanceAccumulator",
    "PanopticAccumulator",
    "SemanticAccumulator",
    "load_panoptic_png",
    "pq_compute",
    "semantic_compute",
]
