"""Training data: FC-CLIP's large-scale-jitter augmentation, targets and batching (numpy / PIL, no detectron2).

The reference trains COCO panoptic with `COCOPanopticNewBaselineDatasetMapper`: a random horizontal flip,
`ResizeScale` (fit the image into a square of side ``image_size * U(min_scale, max_scale)``, keeping its aspect
ratio) and `FixedSizeCrop` (a random ``image_size`` square crop of a larger image, padding of a smaller one at the
bottom/right), bilinear for the image and nearest for the segment ids. `lsj_augment` does the same with a seeded
`numpy.random.Generator`, drawing the same random numbers in the same order (flip, scale, crop offset).

One deliberate difference: masks that the crop empties are dropped (with their classes, `Augmented.keep`). The
reference keeps them as empty targets, which the matcher then pairs with some query, trained towards an empty mask
with a real class. `lsj_augment` also returns the valid (non-padding) region; the reference's criterion leaves its
padding mask unused (a "TODO use valid"), and so does ours.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

__all__ = [
    "Augmented",
    "collate",
    "collate_batches",
    "lsj_augment",
    "make_targets",
    "nearest_indices",
    "normalize_images",
    "pack_sample",
    "train_sample",
    "unpack_sample",
]


class Augmented(NamedTuple):
    """The output of `lsj_augment` (S = image_size, M = masks kept).

    image: (S, S, 3) uint8; the padding is `pad_value`.
    masks: (M, S, S) bool; False in the padding.
    valid: (S, S) bool, True on image pixels, False on padding.
    keep: (M,) int64 indices of the kept input masks (those not emptied by the crop), increasing.
    """

    image: np.ndarray
    masks: np.ndarray
    valid: np.ndarray
    keep: np.ndarray


def nearest_indices(in_size: int, out_size: int, start: int = 0, count: int | None = None) -> np.ndarray:
    """Source index of each output pixel of a nearest-neighbour resize from `in_size` to `out_size` pixels.

    Exactly PIL's ``Image.NEAREST`` resize (and so detectron2's `apply_segmentation`): pixel centres, with PIL's
    sequential double-precision accumulation ``x_0 = step / 2, x_{i+1} = x_i + step`` (``step = in / out``),
    truncated; plain ``floor((i + 0.5) * step)`` differs from it where that product is an integer. For output
    pixels ``start .. start + count - 1`` (default: all of them). Returns (count,) int64.
    """
    count = out_size - start if count is None else count
    step = in_size / out_size
    positions = np.full(start + count, step, dtype=np.float64)
    positions[0] = step * 0.5
    positions = np.add.accumulate(positions)[start:]
    return np.clip(positions.astype(np.int64), 0, in_size - 1)


def lsj_augment(
    image: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    image_size: int = 1024,
    min_scale: float = 0.1,
    max_scale: float = 2.0,
    *,
    flip_prob: float = 0.5,
    pad_value: int = 128,
) -> Augmented:
    """Large-scale jitter: random horizontal flip, random resize, fixed-size crop with padding.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (N, H, W) bool, any N (0 included); need not be disjoint.
        rng: the only source of randomness; three draws per call (flip, scale, crop offset).
        image_size: S, the output side (the reference's ``INPUT.IMAGE_SIZE``, 1024).
        min_scale, max_scale: the square the image is fitted into has side ``S * U(min_scale, max_scale)``.
        flip_prob: probability of the horizontal flip.
        pad_value: the image's padding. The reference's `FixedSizeCrop` pads with 128 (a grey close to CLIP's mean,
            about 0.1-0.35 after normalisation), not 0.
    Returns:
        `Augmented`: image (S, S, 3), masks (M, S, S), valid (S, S), keep (M,).
    """
    image = np.asarray(image)
    masks = np.asarray(masks, dtype=bool)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    if masks.ndim != 3 or masks.shape[1:] != (h, w):
        raise ValueError(f"expected (N, {h}, {w}) masks, got {masks.shape}")
    s = int(image_size)

    # RandomFlip, ResizeScale, FixedSizeCrop: same draws, same order, same rounding as detectron2.
    flip = rng.uniform() < flip_prob
    scale = rng.uniform(min_scale, max_scale)
    fit = min(s * scale / h, s * scale / w)
    new_h, new_w = (max(1, int(v)) for v in np.round(np.multiply((h, w), fit)))
    u = rng.uniform(0.0, 1.0)  # one draw for both axes, as FixedSizeCrop
    off_y, off_x = (int(v) for v in np.round(np.multiply((max(new_h - s, 0), max(new_w - s, 0)), u)))
    crop_h, crop_w = min(new_h, s), min(new_w, s)

    # The image: bilinear resize of only the crop window (PIL's `box`; the same sampling as resizing the whole
    # image and cropping), then padding.
    pil = Image.fromarray(image)
    if flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    sy, sx = h / new_h, w / new_w
    box = (off_x * sx, off_y * sy, (off_x + crop_w) * sx, (off_y + crop_h) * sy)
    window = np.asarray(pil.resize((crop_w, crop_h), Image.Resampling.BILINEAR, box=box))
    out_image = np.full((s, s, 3), pad_value, dtype=np.uint8)
    out_image[:crop_h, :crop_w] = window

    # The masks: nearest-neighbour resize (the reference resizes the segment-id PNG with NEAREST) of the window.
    rows = nearest_indices(h, new_h, off_y, crop_h)
    cols = nearest_indices(w, new_w, off_x, crop_w)
    if flip:
        cols = w - 1 - cols
    n = len(masks)
    if n and masks.sum(axis=0, dtype=np.int64).max() <= 1:
        # Disjoint masks (panoptic segments): resample one id map, as the reference resamples the PNG.
        ids = np.where(masks.any(axis=0), masks.argmax(axis=0) + 1, 0).astype(np.int32)
        out_ids = np.zeros((s, s), dtype=np.int32)
        out_ids[:crop_h, :crop_w] = ids[rows[:, None], cols[None, :]]
        keep = np.flatnonzero(np.bincount(out_ids.ravel(), minlength=n + 1)[1:]).astype(np.int64)
        out_masks = out_ids[None] == (keep + 1)[:, None, None]
    else:
        cropped = masks[:, rows[:, None], cols[None, :]]  # (N, crop_h, crop_w)
        keep = np.flatnonzero(cropped.any(axis=(1, 2))).astype(np.int64)
        out_masks = np.zeros((len(keep), s, s), dtype=bool)
        out_masks[:, :crop_h, :crop_w] = cropped[keep]

    valid = np.zeros((s, s), dtype=bool)
    valid[:crop_h, :crop_w] = True
    return Augmented(out_image, out_masks, valid, keep)


def make_targets(masks: np.ndarray | torch.Tensor, classes: np.ndarray | torch.Tensor | Sequence[int]
                 ) -> dict[str, torch.Tensor]:
    """The criterion's target of one image: ``{"labels": (N,) int64, "masks": (N, H, W) bool}``.

    Args:
        masks: (N, H, W), non-zero inside each segment.
        classes: (N,) contiguous class indices.
    """
    masks_t = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).bool()
    labels = torch.as_tensor(np.asarray(classes, dtype=np.int64) if not isinstance(classes, torch.Tensor)
                             else classes).to(torch.int64).reshape(-1)
    if masks_t.ndim != 3 or masks_t.shape[0] != labels.shape[0]:
        raise ValueError(f"expected (N, H, W) masks and (N,) classes, got {tuple(masks_t.shape)} and "
                         f"{tuple(labels.shape)}")
    return {"labels": labels, "masks": masks_t}


def train_sample(
    image: np.ndarray,
    masks: np.ndarray,
    classes: np.ndarray,
    iscrowd: np.ndarray | None,
    rng: np.random.Generator,
    *,
    ignore: np.ndarray | None = None,
    **lsj: Any,
) -> dict[str, Any]:
    """One training example as the reference's dataset mapper makes it: crowd segments dropped, LSJ, targets.

    Args:
        image, masks, classes, iscrowd: as `fcclip.datasets.coco_panoptic.CocoPanoptic.load` returns them
            (``train_sample(*dataset.load(record), rng)``); `iscrowd` None when there is no crowd.
        rng: for `lsj_augment`.
        ignore: (H, W) bool pixels the loss leaves out (a pseudo-label's low-score segments), or None; it goes
            through the same flip, resize and crop as the masks.
        **lsj: `lsj_augment`'s keyword arguments (image_size, min_scale, max_scale, flip_prob, pad_value).
    Returns:
        ``{"image": (S, S, 3) uint8, "valid": (S, S) bool, "labels": (M,) int64 tensor,
        "masks": (M, S, S) bool tensor}``, ready for `collate`; with `ignore`, also ``"ignore": (S, S) bool``.
    """
    masks = np.asarray(masks, dtype=bool)
    classes = np.asarray(classes, dtype=np.int64)
    if iscrowd is not None:
        keep = ~np.asarray(iscrowd, dtype=bool)
        masks, classes = masks[keep], classes[keep]
    if ignore is None:
        out = lsj_augment(image, masks, rng, **lsj)
        return {"image": out.image, "valid": out.valid, **make_targets(out.masks, classes[out.keep])}
    # the ignore region rides along as one more mask (outside every segment, so the masks stay disjoint when they
    # were), and is taken out again after the crop
    ignore = np.asarray(ignore, dtype=bool) & ~masks.any(axis=0)
    out = lsj_augment(image, np.concatenate([masks, ignore[None]]), rng, **lsj)
    n = len(masks)
    is_target = out.keep < n
    augmented_ignore = out.masks[~is_target].any(axis=0) if (~is_target).any() else np.zeros_like(out.valid)
    return {"image": out.image, "valid": out.valid, "ignore": augmented_ignore,
            **make_targets(out.masks[is_target], classes[out.keep[is_target]])}


def pack_sample(sample: dict[str, Any]) -> dict[str, np.ndarray]:
    """A `train_sample` as fixed-shape arrays, to travel in a table (Ray Data) between processes.

    Returns ``{"image": (S, S, 3) uint8, "valid": (S, S) bool, "segments": (S, S) int32 (0: no target, -1: ignore,
    k: the k-th target), "labels": (M,) int64}``. The target masks must be disjoint (panoptic segments are).
    """
    masks = np.asarray(sample["masks"], dtype=bool)
    if len(masks) and masks.sum(axis=0, dtype=np.int64).max() > 1:
        raise ValueError("pack_sample needs disjoint target masks")
    ids = np.zeros(np.shape(sample["valid"]), dtype=np.int32)
    if sample.get("ignore") is not None:
        ids[np.asarray(sample["ignore"], dtype=bool)] = -1
    for k, m in enumerate(masks):
        ids[m] = k + 1
    return {"image": np.asarray(sample["image"]), "valid": np.asarray(sample["valid"], dtype=bool), "segments": ids,
            "labels": np.asarray(sample["labels"], dtype=np.int64)}


def unpack_sample(packed: dict[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of `pack_sample`: a sample for `collate`, with ``"ignore"``."""
    ids = np.asarray(packed["segments"])
    labels = np.asarray(packed["labels"], dtype=np.int64).reshape(-1)
    masks = ids[None] == np.arange(1, len(labels) + 1, dtype=ids.dtype)[:, None, None]
    return {"image": packed["image"], "valid": packed["valid"], "ignore": ids == -1,
            **make_targets(masks, labels)}


def collate(samples: Sequence[dict[str, Any]], size_divisibility: int = 32) -> dict[str, Any]:
    """Batch samples (``{"image": (H, W, 3) uint8, "labels", "masks": (N, H, W), "valid"?: (H, W)}``).

    Images are stacked as uint8, not normalised (the model normalises; see `normalize_images`), zero-padded at the
    bottom/right to the largest size rounded up to a multiple of `size_divisibility` (a no-op for LSJ's 1024
    squares); target masks are padded the same way, as the reference's `prepare_targets` does.

    Returns:
        ``{"images": (B, 3, H, W) uint8, "image_sizes": [(h, w)] before this padding, "valid": (B, H, W) bool
        (a sample's "valid", or its whole image when it has none; False in this padding),
        "targets": [{"labels": (N_b,) int64, "masks": (N_b, H, W) bool}]}``. When any sample has an ``"ignore"``
        (H, W) mask, every target also has ``"ignore": (H, W) bool`` (False for samples without one and in this
        padding), which `fcclip.training.ignore.IgnoreRegionCriterion` leaves out of the mask losses.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    sizes = [tuple(int(v) for v in np.shape(s["image"])[:2]) for s in samples]
    d = max(1, int(size_divisibility))
    height = -(-max(h for h, _ in sizes) // d) * d
    width = -(-max(w for _, w in sizes) // d) * d
    images = torch.zeros((len(samples), 3, height, width), dtype=torch.uint8)
    valid = torch.zeros((len(samples), height, width), dtype=torch.bool)
    any_ignore = any(s.get("ignore") is not None for s in samples)
    targets = []
    for b, (sample, (h, w)) in enumerate(zip(samples, sizes)):
        image = torch.as_tensor(np.ascontiguousarray(sample["image"]))
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"sample {b}: expected an (H, W, 3) uint8 image, got {tuple(image.shape)} {image.dtype}")
        images[b, :, :h, :w] = image.permute(2, 0, 1)
        if sample.get("valid") is not None:
            valid[b, :h, :w] = torch.as_tensor(np.asarray(sample["valid"], dtype=bool))
        else:
            valid[b, :h, :w] = True
        target = make_targets(sample["masks"], sample["labels"])
        masks = torch.zeros((len(target["labels"]), height, width), dtype=torch.bool)
        masks[:, :h, :w] = target["masks"]
        targets.append({"labels": target["labels"], "masks": masks})
        if any_ignore:
            ignore = torch.zeros((height, width), dtype=torch.bool)
            if sample.get("ignore") is not None:
                ignore[:h, :w] = torch.as_tensor(np.asarray(sample["ignore"], dtype=bool))
            targets[-1]["ignore"] = ignore
    return {"images": images, "image_sizes": sizes, "valid": valid, "targets": targets}


def collate_batches(samples: Iterable[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    """`collate`d batches of `batch_size` consecutive samples of a stream; a last incomplete batch is dropped."""
    samples = iter(samples)
    while len(chunk := list(itertools.islice(samples, batch_size))) == batch_size:
        yield collate(chunk)


def normalize_images(images: torch.Tensor, image_sizes: Sequence[tuple[int, int]], pixel_mean: Sequence[float],
                     pixel_std: Sequence[float]) -> torch.Tensor:
    """The model's input from collated uint8 images: (x - mean) / std, then zero outside each image's size.

    This is the reference's order (normalise, then pad with zeros); LSJ's own padding (`pad_value`) is inside the
    image size and is normalised like image pixels, as in the reference. Returns (B, 3, H, W) float32.
    """
    x = images.float()
    for c, (mean, std) in enumerate(zip(pixel_mean, pixel_std)):  # Python numbers: no copy to the device
        x[:, c].sub_(float(mean)).div_(float(std))
    for b, (h, w) in enumerate(image_sizes):
        x[b, :, h:, :] = 0
        x[b, :, :, w:] = 0
    return x
