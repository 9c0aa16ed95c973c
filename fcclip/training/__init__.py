"""Training parts: Hungarian matcher, set criterion, point sampling, LSJ augmentation and batching.

The training loop itself (Ray Train) is not part of this library (it is the `fcclip train` command); everything here
is plain PyTorch / numpy.

    from fcclip.training import build_criterion, outputs_from_model, collate, train_sample
    criterion = build_criterion(num_classes=133)            # the reference's COCO recipe
    losses = criterion(outputs_from_model(model(images, text)), batch["targets"])
    loss = criterion.total(losses)
"""
from .criterion import (
    SetCriterion,
    average_num_masks,
    build_criterion,
    build_weight_dict,
    dice_loss,
    outputs_from_model,
    sigmoid_ce_loss,
    weighted_total,
)
from .data import Augmented, collate, lsj_augment, make_targets, nearest_indices, normalize_images, train_sample
from .matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost
from .points import point_sample, uncertain_point_coords_with_randomness, uncertainty

__all__ = [
    "Augmented",
    "HungarianMatcher",
    "SetCriterion",
    "average_num_masks",
    "batch_dice_cost",
    "batch_sigmoid_ce_cost",
    "build_criterion",
    "build_weight_dict",
    "collate",
    "dice_loss",
    "lsj_augment",
    "make_targets",
    "nearest_indices",
    "normalize_images",
    "outputs_from_model",
    "point_sample",
    "sigmoid_ce_loss",
    "train_sample",
    "uncertain_point_coords_with_randomness",
    "uncertainty",
    "weighted_total",
]
