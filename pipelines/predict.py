"""``fcclip predict``: segment a few images without Ray; per image a COCO panoptic PNG, its JSON and an overlay.

    fcclip predict IMAGE... --vocab VOCAB --out DIR [--model PRESET|YAML] [--weights W] [--device D]
                            [--short-edge N] [--max-size N] [--min-score S]

An input that cannot be read is reported and skipped; the others are still written, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fcclip.build import build_model, resolve_device
from fcclip.checkpoint import CheckpointError
from fcclip.config import ConfigError
from fcclip.images import ImageDecodeError, uri_protocol
from fcclip.masks import id2rgb, panoptic_columns
from fcclip.precision import use_tf32
from fcclip.predictor import Predictor
from fcclip.visualize import draw_panoptic
from fcclip.vocabulary import VocabularyError, load_vocabulary
from fcclip_pipelines.arguments import COUNT, SCORE, file_in_the_way, number


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --weights, --device, --short-edge, --max-size."""
    p.add_argument("--model", default="fcclip-convnext-large", help="preset name or preset YAML (default: %(default)s)")
    p.add_argument(
        "--weights",
        default="official",
        help="'official' (released checkpoint, downloaded once), 'clip', 'random' (smoke runs), or a path/URI",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: CUDA when available)")
    p.add_argument("--short-edge", type=number(int, minimum=0), default=None,
                   help="test-time short edge, 0 keeps the image's size (default: the model's, 800 for the released "
                        "models)")
    p.add_argument("--max-size", type=COUNT, default=None,
                   help="test-time long-edge limit (default: the model's, 1333 for the released models)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files or URIs")
    p.add_argument("--vocab", required=True, help="builtin name, .txt/.json/.yaml file, or inline 'cat; dog, puppy'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--min-score", type=SCORE, default=0.0, help="drop segments scoring below this (default: keep all)")
    add_model_arguments(p)


class UsageError(ValueError):
    """An argument that cannot be used here (the device, the output folder)."""


def main_args(args: argparse.Namespace) -> int:
    try:
        return predict(args)
    except (ConfigError, VocabularyError, CheckpointError, FileNotFoundError, UsageError) as e:
        print(f"fcclip predict: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2


def check_device(spec: str) -> torch.device:
    """The device ``spec`` names, once it is known to work here; else UsageError."""
    try:
        device = resolve_device(spec)
        torch.empty(0, device=device)  # initialises CUDA: no driver or no such GPU raise here
    except RuntimeError as e:
        reason = (str(e).strip().splitlines() or ["unusable"])[0]
        raise UsageError(f"--device {spec}: {reason} (use cpu, or cuda / cuda:N where there is a GPU)") from None
    return device


def _short_edge(value: int | None):
    if value is None:
        return "default"
    return None if value <= 0 else value


def predict(args: argparse.Namespace) -> int:
    out = Path(args.out)
    problem = file_in_the_way(args.out)
    if problem:
        raise UsageError(problem)
    _check_protocols(args.images)
    vocabulary = load_vocabulary(args.vocab)  # a mistake in it is reported before the model is built
    model = build_model(args.model, weights=args.weights, device=check_device(args.device))
    use_tf32(model.device)
    predictor = Predictor(
        model, vocabulary, short_edge=_short_edge(args.short_edge), max_size=args.max_size, tasks=("panoptic",)
    )
    out.mkdir(parents=True, exist_ok=True)
    vocab = predictor.vocabulary
    colors = {c.id: c.color for c in vocab.categories}
    annotations, failed, used = [], 0, set()
    for source in args.images:
        stem = _unique_stem(Path(source).stem or "image", used)
        try:
            image = predictor.preprocess(source)
            result = predictor.predict_batch([image])[0]
        except (ImageDecodeError, OSError) as e:
            failed += 1
            message = str(e) if str(e).startswith(source) else f"{source}: {e}"  # ImageDecodeError names it
            print(f"error: {message}", file=sys.stderr)
            continue
        record, segments, segment_map = _write_image(out, stem, source, result, args.min_score)
        annotations.append(record)
        overlay = draw_panoptic(image, segment_map, [dict(s, color=colors[s["category_id"]]) for s in segments])
        overlay.save(out / f"{stem}_overlay.png")
        labels = ", ".join(sorted({s["label"] for s in segments})) or "nothing"
        print(f"{source}: {len(segments)} segments ({labels}) -> {out / (stem + '_overlay.png')}")
    categories = [
        {"id": c.id, "name": c.names[0], "synonyms": list(c.names), "isthing": int(c.is_thing), "color": list(c.color)}
        for c in vocab.categories
    ]
    summary = {
        "model": model.config.name,
        "weights": getattr(model, "weights_id", None),
        "vocabulary": {"name": vocab.name, "digest": vocab.digest},
        "annotations": annotations,
        "categories": categories,
    }
    (out / "panoptic.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(annotations)} image(s) labeled, {failed} failed; results in {out}")
    return 1 if failed else 0


def _check_protocols(sources: list[str]) -> None:
    """An input whose URI protocol fsspec does not know, or whose file system is not installed (gs:// without gcsfs),
    is a typo or a missing extra for every input of its kind: fsspec's registry error, before the model loads,
    rather than after some of the images."""
    protocols = {uri_protocol(source) for source in sources} - {None}
    if protocols:
        import fsspec

        for protocol in sorted(protocols):
            fsspec.get_filesystem_class(protocol)


def _write_image(out: Path, stem: str, source: str, result, min_score: float):
    """Write ``STEM.png`` (COCO panoptic PNG) and ``STEM.json``; returns (record, kept segments, segment map)."""
    pan = result.panoptic
    segments = [s for s in pan.segments if s["score"] >= min_score]
    keep_ids = np.array([s["id"] for s in segments], dtype=np.int32)
    segment_map = np.where(np.isin(pan.segment_map, keep_ids), pan.segment_map, 0).astype(np.int32)
    Image.fromarray(id2rgb(segment_map)).save(out / f"{stem}.png")
    columns = panoptic_columns(segment_map, segments)  # area and box as fcclip label stores them
    info = [
        {
            "id": s["id"],
            "category_id": s["category_id"],
            "label": s["label"],
            "isthing": int(s["is_thing"]),
            "iscrowd": 0,
            "score": round(s["score"], 6),
            "area": area,
            "bbox": bbox,
        }
        for s, area, bbox in zip(segments, columns["area"], columns["bbox"])
    ]
    record = {
        "image": str(source),
        "file_name": f"{stem}.png",
        "image_id": stem,
        "height": result.height,
        "width": result.width,
        "segments_info": info,
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    return record, segments, segment_map


def _unique_stem(stem: str, used: set[str]) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)[:100] or "image"
    name, i = safe, 1
    while name in used:
        i += 1
        name = f"{safe}-{i}"
    used.add(name)
    return name
