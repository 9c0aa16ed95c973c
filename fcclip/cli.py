"""The ``fcclip`` command line.

    fcclip predict IMAGE... --vocab VOCAB --out DIR [--model PRESET] [--weights W]
    fcclip label SOURCE --out DEST --vocab VOCAB [...]
    fcclip synth images --out DIR [--count N]
    fcclip synth coco-panoptic --out ROOT --images N [--seed S] [--size H W]
    fcclip metrics panoptic|semantic ...
    fcclip train | eval | submit | show ...
    fcclip models | fcclip vocabularies

Each subcommand is ``main(argv) -> int`` underneath, so tests call them directly.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("fcclip")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="fcclip-convnext-large", help="preset name or preset YAML (default: %(default)s)")
    p.add_argument(
        "--weights",
        default="official",
        help="'official' (released checkpoint, downloaded once), 'clip', 'random' (smoke runs), or a path/URI",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: CUDA when available)")
    p.add_argument("--short-edge", type=int, default=None, help="test-time short edge (default: the model's, 800)")
    p.add_argument("--max-size", type=int, default=None, help="test-time long-edge limit (default: the model's, 1333)")


def _short_edge(value: int | None):
    if value is None:
        return "default"
    return None if value <= 0 else value


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .build import build_model
    from .images import ImageDecodeError
    from .masks import id2rgb
    from .predictor import Predictor
    from .visualize import draw_panoptic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, weights=args.weights, device=args.device)
    predictor = Predictor(
        model, args.vocab, short_edge=_short_edge(args.short_edge), max_size=args.max_size, tasks=("panoptic",)
    )
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
            print(f"error: {source}: {e}", file=sys.stderr)
            continue
        pan = result.panoptic
        segments = [s for s in pan.segments if s["score"] >= args.min_score]
        keep_ids = np.array([s["id"] for s in segments], dtype=np.int32)
        seg_map = np.where(np.isin(pan.segment_map, keep_ids), pan.segment_map, 0).astype(np.int32)
        Image.fromarray(id2rgb(seg_map)).save(out / f"{stem}.png")
        info = [
            {
                "id": s["id"],
                "category_id": s["category_id"],
                "label": s["label"],
                "isthing": int(s["is_thing"]),
                "iscrowd": 0,
                "score": round(s["score"], 6),
                "area": s["area"],
                "bbox": s["bbox"],
            }
            for s in segments
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
        annotations.append(record)
        overlay = draw_panoptic(
            image, seg_map, [dict(s, color=colors[s["category_id"]]) for s in segments]
        )
        overlay.save(out / f"{stem}_overlay.png")
        labels = ", ".join(sorted({s["label"] for s in segments})) or "nothing"
        print(f"{source}: {len(segments)} segments ({labels}) -> {out / (stem + '_overlay.png')}")
    categories = [
        {"id": c.id, "name": c.names[0], "synonyms": list(c.names), "isthing": int(c.isthing), "color": list(c.color)}
        for c in vocab.categories
    ]
    (out / "panoptic.json").write_text(
        json.dumps(
            {
                "model": model.config.name,
                "weights": getattr(model, "weights_id", None),
                "vocabulary": {"name": vocab.name, "digest": vocab.digest},
                "annotations": annotations,
                "categories": categories,
            },
            indent=1,
        )
    )
    print(f"{len(annotations)} image(s) labelled, {failed} failed; results in {out}")
    return 1 if failed else 0


def _unique_stem(stem: str, used: set[str]) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)[:100] or "image"
    name, i = safe, 1
    while name in used:
        i += 1
        name = f"{safe}-{i}"
    used.add(name)
    return name


def cmd_synth_images(args: argparse.Namespace) -> int:
    from .datasets.synthetic import write_images

    paths = write_images(args.out, count=args.count, size=(args.height, args.width), seed=args.seed)
    print(f"wrote {len(paths)} image(s) to {args.out}")
    return 0


# Subcommands that live in pipelines/ (they need the Ray extra): module and the package each one needs.
PIPELINE_COMMANDS = {
    "label": ("pipelines.label", "ray", "label an image collection on Ray: Parquet with COCO RLE masks"),
    "train": ("pipelines.train", "ray.train", "train FC-CLIP with Ray Train"),
    "eval": ("pipelines.evaluate", "ray.data", "zero-shot benchmark evaluation (PQ, AP, mIoU) on Ray"),
    "show": ("pipelines.show", "pyarrow", "an HTML report of a labeling output: counts, classes, scores, errors, overlays"),
    "submit": ("pipelines.submit", "ray", "run an fcclip command on a Ray cluster via the Job API and follow it"),
}


def cmd_pipeline(args: argparse.Namespace) -> int:
    import importlib

    module, requirement, _ = PIPELINE_COMMANDS[args.command]
    try:
        importlib.import_module(requirement)
        main_args = importlib.import_module(module).main_args
    except ImportError as e:
        print(f"fcclip {args.command} needs the Ray extra: pip install 'fcclip[ray]' ({e})", file=sys.stderr)
        return 2
    return main_args(args)


def _add_pipeline_parsers(sub) -> None:
    import importlib

    for name, (module, _, help_text) in PIPELINE_COMMANDS.items():
        p = sub.add_parser(name, help=f"{help_text} (needs fcclip[ray])")
        p.set_defaults(func=cmd_pipeline)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError:  # the extra is not installed: the subcommand says so when used
            p.add_argument("rest", nargs=argparse.REMAINDER)


def cmd_synth_coco_panoptic(args: argparse.Namespace) -> int:
    from .datasets.synthetic_panoptic import synth_coco_panoptic_main

    return synth_coco_panoptic_main(args)


def cmd_models(args: argparse.Namespace) -> int:
    from .config import list_models, load_config

    for name in list_models():
        cfg = load_config(name)
        released = "released checkpoint" if cfg.weights.url else "no released checkpoint"
        print(f"{name:24s} CLIP {cfg.clip.model_name:24s} {released}")
    return 0


def cmd_vocabularies(args: argparse.Namespace) -> int:
    from .vocabulary import list_vocabularies, load_vocabulary

    for name in list_vocabularies():
        v = load_vocabulary(name)
        print(f"{name:20s} {len(v)} classes, {sum(v.thing_mask)} things")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcclip", description="FC-CLIP open-vocabulary panoptic segmentation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment images; write COCO panoptic PNG + JSON and an overlay per image")
    p.add_argument("images", nargs="+", help="image files or URIs")
    p.add_argument("--vocab", required=True, help="builtin name, .txt/.json/.yaml file, or inline 'cat; dog, puppy'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--min-score", type=float, default=0.0, help="drop segments scoring below this (default: keep all)")
    _add_model_args(p)
    p.set_defaults(func=cmd_predict)

    _add_pipeline_parsers(sub)

    p = sub.add_parser("synth", help="generate synthetic data")
    synth = p.add_subparsers(dest="what", required=True)
    s = synth.add_parser("images", help="a folder of synthetic RGB images (shapes on textured backgrounds)")
    s.add_argument("--out", required=True)
    s.add_argument("--count", type=int, default=4)
    s.add_argument("--height", type=int, default=240)
    s.add_argument("--width", type=int, default=320)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth_images)
    s = synth.add_parser("coco-panoptic", help="a small synthetic dataset in the COCO panoptic layout (train2017 + val2017)")
    s.add_argument("--out", required=True, help="dataset root")
    s.add_argument("--images", type=int, default=16, help="training images; val2017 gets a quarter (at least 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"))
    s.set_defaults(func=cmd_synth_coco_panoptic)

    sub.add_parser("models", help="list model presets").set_defaults(func=cmd_models)
    sub.add_parser("vocabularies", help="list builtin vocabularies").set_defaults(func=cmd_vocabularies)

    from .metrics.cli import add_arguments as add_metrics_arguments

    add_metrics_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    warnings.simplefilter("default", UserWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .config import ConfigError
    from .vocabulary import VocabularyError
    from .checkpoint import CheckpointError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, VocabularyError, CheckpointError, FileNotFoundError) as e:
        print(f"fcclip: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
