"""Matcher, criterion and point sampling on hand-built cases with known answers."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fcclip.training import (
    HungarianMatcher,
    SetCriterion,
    average_num_masks,
    build_criterion,
    build_weight_dict,
    dice_loss,
    outputs_from_model,
    point_sample,
    sigmoid_ce_loss,
    uncertain_point_coords_with_randomness,
    weighted_total,
)
from fcclip.training.matcher import batch_dice_cost, batch_sigmoid_ce_cost

BIG = 30.0  # a logit whose sigmoid is 0 or 1 in float32


def _rect_masks(size=(16, 16)):
    """Four disjoint rectangles (T, H, W) bool."""
    h, w = size
    masks = torch.zeros(4, h, w, dtype=torch.bool)
    masks[0, : h // 2, : w // 2] = True
    masks[1, : h // 2, w // 2 :] = True
    masks[2, h // 2 :, : w // 4] = True
    masks[3, h // 2 :, w // 4 :] = True
    return masks


def _perfect_outputs(masks, labels, num_queries, num_classes, perm):
    """Predictions where query perm[j] is an exact copy of target j, confident in its class; others predict void."""
    q = num_queries
    class_logits = torch.full((1, q, num_classes + 1), -BIG)
    class_logits[0, :, num_classes] = BIG  # unmatched queries: no object
    mask_logits = torch.full((1, q) + masks.shape[-2:], -BIG)
    for j, query in enumerate(perm):
        class_logits[0, query] = -BIG
        class_logits[0, query, labels[j]] = BIG
        mask_logits[0, query] = torch.where(masks[j], BIG, -BIG)
    return {"pred_logits": class_logits, "pred_masks": mask_logits}


# ------------------------------------------------------------------------------------------------------------------
# point sampling


def test_point_sample_at_pixel_centres_is_the_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    ii, jj = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    coords = torch.stack([(jj + 0.5) / 7, (ii + 0.5) / 5], dim=-1).reshape(1, -1, 2).expand(2, -1, -1)
    out = point_sample(x, coords)
    assert out.shape == (2, 3, 35)
    torch.testing.assert_close(out, x.flatten(2))
    # the same as grid_sample on the [-1, 1] grid, and bilinear between centres
    torch.testing.assert_close(out, F.grid_sample(x, 2 * coords[:, :, None] - 1, align_corners=False)[..., 0])
    mid = point_sample(x, torch.tensor([[[1.0 / 7, 0.5 / 5]]]).expand(2, -1, -1))[..., 0]
    torch.testing.assert_close(mid, (x[:, :, 0, 0] + x[:, :, 0, 1]) / 2)


def test_uncertain_points_prefer_logits_near_zero():
    logits = torch.full((3, 1, 32, 32), 10.0)
    logits[:, :, :, :8] = 0.0  # the left quarter is uncertain
    g = torch.Generator().manual_seed(0)
    coords = uncertain_point_coords_with_randomness(logits, lambda x: -x.abs(), 100, 3.0, 0.75, generator=g)
    assert coords.shape == (3, 100, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    # 75 importance points out of 300 candidates, ~75 of which fall in the left quarter: all of those are chosen
    assert (coords[:, :60, 0] < 8 / 32 + 1 / 64).all()
    # seeded: the same points again
    again = uncertain_point_coords_with_randomness(logits, lambda x: -x.abs(), 100, 3.0, 0.75,
                                                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(coords, again)
    with pytest.raises(ValueError):
        uncertain_point_coords_with_randomness(logits, lambda x: -x.abs(), 10, 0.5, 0.75)


# ------------------------------------------------------------------------------------------------------------------
# matcher


def test_matcher_finds_the_obvious_permutation():
    torch.manual_seed(0)
    masks = _rect_masks()
    labels = torch.tensor([2, 0, 1, 2])
    perm = [5, 0, 3, 1]  # target j is a copy at query perm[j]
    outputs = _perfect_outputs(masks, labels, num_queries=7, num_classes=3, perm=perm)
    matcher = HungarianMatcher(num_points=256)
    (rows, cols), = matcher(outputs, [{"labels": labels, "masks": masks}])
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert rows.tolist() == sorted(perm)
    assert dict(zip(cols.tolist(), rows.tolist())) == dict(enumerate(perm))


def test_matcher_targets_at_a_higher_resolution_and_several_images():
    torch.manual_seed(0)
    masks = _rect_masks((8, 8))
    labels = torch.tensor([0, 1, 2, 0])
    out1 = _perfect_outputs(masks, labels, 5, 3, [4, 3, 2, 1])
    out2 = _perfect_outputs(masks[:2], labels[:2], 5, 3, [1, 0])
    outputs = {k: torch.cat([out1[k], out2[k]]) for k in out1}
    big = masks.repeat_interleave(4, 1).repeat_interleave(4, 2)  # the same masks at 4x the prediction's size
    targets = [{"labels": labels, "masks": big}, {"labels": labels[:2], "masks": big[:2]}]
    indices = HungarianMatcher(num_points=512)(outputs, targets)
    assert dict(zip(indices[0][1].tolist(), indices[0][0].tolist())) == {0: 4, 1: 3, 2: 2, 3: 1}
    assert dict(zip(indices[1][1].tolist(), indices[1][0].tolist())) == {0: 1, 1: 0}


def test_matcher_without_targets_and_in_float32_under_autocast():
    matcher = HungarianMatcher(num_points=64)
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_masks": torch.randn(2, 4, 8, 8)}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)},
               {"labels": torch.tensor([1]), "masks": torch.ones(1, 32, 32, dtype=torch.bool)}]
    indices = matcher(outputs, targets)
    assert [len(i) for i, _ in indices] == [0, 1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.cost_matrix(outputs["pred_logits"][1].bfloat16(), outputs["pred_masks"][1].bfloat16(),
                                   targets[1]["labels"], targets[1]["masks"])
    assert cost.dtype == torch.float32 and cost.shape == (4, 1)


def test_matching_costs_closed_form():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    sig = torch.sigmoid(logits)
    bce = -(targets[None] * sig[:, None].log() + (1 - targets[None]) * (1 - sig[:, None]).log()).mean(-1)
    torch.testing.assert_close(batch_sigmoid_ce_cost(logits, targets), bce)
    dice = 1 - (2 * sig @ targets.T + 1) / (sig.sum(-1)[:, None] + targets.sum(-1)[None] + 1)
    torch.testing.assert_close(batch_dice_cost(logits, targets), dice)


# ------------------------------------------------------------------------------------------------------------------
# losses


def test_dice_loss_of_perfect_and_disjoint_masks():
    target = torch.zeros(1, 100)
    target[0, :30] = 1
    perfect = torch.where(target > 0, BIG, -BIG)
    assert dice_loss(perfect, target, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    disjoint = torch.where(target > 0, -BIG, BIG)  # predicts the other 70 points
    assert dice_loss(disjoint, target, 1.0).item() == pytest.approx(1 - 1 / (70 + 30 + 1), abs=1e-6)
    # two masks normalised by num_masks = 2: the mean
    two = dice_loss(torch.cat([perfect, disjoint]), torch.cat([target, target]), 2.0)
    assert two.item() == pytest.approx((1 - 1 / 101) / 2, abs=1e-6)


def test_sigmoid_ce_loss_closed_form():
    logits = torch.tensor([[2.0, -1.0, 0.0, 3.0], [0.5, 0.5, -2.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    expected = 0.0
    for x_row, t_row in zip(logits.tolist(), targets.tolist()):
        expected += sum(math.log(1 + math.exp(x)) - x * t for x, t in zip(x_row, t_row)) / len(x_row)
    assert sigmoid_ce_loss(logits, targets, 3.0).item() == pytest.approx(expected / 3.0, rel=1e-6)


class _FixedMatcher(HungarianMatcher):
    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def forward(self, outputs, targets, generator=None):
        return self.indices


def test_cross_entropy_with_no_object_weight_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]]])  # B=1, Q=3, K=2
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}]
    indices = [(torch.tensor([1]), torch.tensor([0]))]  # query 1 <- target 0 (class 1); queries 0, 2: no object
    criterion = SetCriterion(2, _FixedMatcher(indices), {}, eos_coef=0.1)
    loss = criterion.loss_labels({"pred_logits": logits}, targets, indices)["loss_ce"]
    log_p = logits[0].log_softmax(-1)
    expected = -(0.1 * log_p[0, 2] + 1.0 * log_p[1, 1] + 0.1 * log_p[2, 2]) / (0.1 + 1.0 + 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert criterion.empty_weight.tolist() == pytest.approx([1.0, 1.0, 0.1])


def test_image_without_annotations_has_only_the_no_object_term():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 4, requires_grad=True)
    masks = torch.randn(1, 5, 8, 8, requires_grad=True)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}]
    criterion = build_criterion(3, num_points=64, dec_layers=1)
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    expected = -logits[0].log_softmax(-1)[:, 3].mean()  # every query targets no-object (equal weights)
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    criterion.total(losses).backward()
    assert logits.grad.abs().sum() > 0
    assert masks.grad is not None and masks.grad.abs().sum() == 0  # connected, zero


def test_perfect_predictions_have_near_zero_losses_on_uniform_points():
    torch.manual_seed(0)
    masks = _rect_masks((32, 32))
    labels = torch.tensor([2, 0, 1, 2])
    outputs = _perfect_outputs(masks, labels, 6, 3, [5, 0, 3, 1])
    targets = [{"labels": labels, "masks": masks}]
    # Uniform points only: nearly all fall inside a mask or outside all of them. (Importance sampling would pick
    # the mask edges and the image border, where the bilinear target or the zero padding makes values fractional.)
    criterion = build_criterion(3, num_points=400, dec_layers=1, importance_sample_ratio=0.0)
    losses = criterion(outputs, targets, generator=torch.Generator().manual_seed(0))
    assert losses["loss_dice"].item() < 0.05
    assert losses["loss_ce"].item() < 1e-6


def test_gradients_flow_and_deep_supervision_keys_are_weighted():
    torch.manual_seed(0)
    b, q, k = 2, 6, 3
    heads = [(torch.randn(b, q, k + 1, requires_grad=True), torch.randn(b, q, 8, 8, requires_grad=True))
             for _ in range(3)]
    out = SimpleNamespace(class_logits=heads[-1][0], mask_logits=heads[-1][1], aux=heads[:-1])
    outputs = outputs_from_model(out)
    assert len(outputs["aux_outputs"]) == 2
    targets = [
        {"labels": torch.tensor([0, 2]), "masks": _rect_masks((32, 32))[:2]},
        {"labels": torch.tensor([1]), "masks": _rect_masks((32, 32))[3:]},
    ]
    criterion = build_criterion(k, num_points=128, dec_layers=3)
    losses = criterion(outputs, targets, generator=torch.Generator().manual_seed(0))
    expected_keys = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert set(losses) == expected_keys
    total, weighted = weighted_total(losses, criterion.weight_dict)
    manual = sum(losses[key] * {"ce": 2.0, "mask": 5.0, "dice": 5.0}[key.split("_")[1]] for key in losses)
    torch.testing.assert_close(total, manual)
    assert set(weighted) == expected_keys
    total.backward()
    for logits, masks in heads:
        assert logits.grad is not None and logits.grad.abs().sum() > 0
        assert masks.grad is not None and masks.grad.abs().sum() > 0
    # the same generator seed gives the same losses
    again = criterion(outputs, targets, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(losses[key], again[key]) for key in losses)


def test_reference_weight_dict_and_unweighted_losses_are_dropped():
    weights = build_weight_dict()  # class 2, mask 5, dice 5, DEC_LAYERS 10
    assert len(weights) == 3 * 10
    assert weights["loss_ce"] == 2.0 and weights["loss_mask_8"] == 5.0 and weights["loss_dice_8"] == 5.0
    assert "loss_ce_9" not in weights
    assert len(build_weight_dict(deep_supervision=False)) == 3
    total, weighted = weighted_total({"loss_ce": torch.tensor(1.0), "loss_other": torch.tensor(7.0)}, weights)
    assert total.item() == 2.0 and set(weighted) == {"loss_ce"}


def test_num_masks_normalisation():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_masks": torch.randn(1, 4, 8, 8)}
    targets = [{"labels": torch.tensor([0, 1]), "masks": _rect_masks((16, 16))[:2]}]
    assert average_num_masks(targets) == 2.0
    assert average_num_masks([{"labels": torch.zeros(0)}]) == 1.0  # clamped
    criterion = build_criterion(2, num_points=64, dec_layers=1)
    local = criterion(outputs, targets, generator=torch.Generator().manual_seed(1))
    global_ = criterion(outputs, targets, num_masks=8.0, generator=torch.Generator().manual_seed(1))
    for key in ("loss_mask", "loss_dice"):
        assert global_[key].item() == pytest.approx(local[key].item() * 2 / 8, rel=1e-5)
    assert global_["loss_ce"].item() == pytest.approx(local["loss_ce"].item(), rel=1e-6)
