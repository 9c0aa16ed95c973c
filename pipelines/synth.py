"""``fcclip synth``: synthetic data for smoke runs and tests.

    fcclip synth images --out DIR [--count N] [--height H] [--width W] [--seed S]
    fcclip synth coco-panoptic --out ROOT --images N [--seed S] [--size H W]
"""
from __future__ import annotations

import argparse
import sys

from fcclip.datasets.synthetic import write_images
from fcclip.datasets.synthetic_panoptic import synth_coco_panoptic_main
from fcclip_pipelines.arguments import COUNT, file_in_the_way


def add_arguments(p: argparse.ArgumentParser) -> None:
    synth = p.add_subparsers(dest="what", required=True)
    s = synth.add_parser("images", help="a folder of synthetic RGB images (shapes on textured backgrounds)")
    s.add_argument("--out", required=True, help="the folder (created) that receives synth_NNNNN.jpg files")
    s.add_argument("--count", type=COUNT, default=4, help="how many images (default: %(default)d)")
    s.add_argument("--height", type=COUNT, default=240, help="pixels (default: %(default)d)")
    s.add_argument("--width", type=COUNT, default=320, help="pixels (default: %(default)d)")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same images (default: %(default)d)")
    s = synth.add_parser("coco-panoptic", help="a small synthetic dataset in the COCO panoptic layout (train2017 + val2017)")
    s.add_argument("--out", required=True, help="dataset root")
    s.add_argument("--images", type=COUNT, default=16, help="training images; val2017 gets a quarter (at least 1)")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same dataset (default: %(default)d)")
    s.add_argument("--size", type=COUNT, nargs=2, default=(256, 320), metavar=("H", "W"),
                   help="image height and width (default: 256 320)")


def main_args(args: argparse.Namespace) -> int:
    problem = file_in_the_way(args.out)
    if problem:
        print(f"fcclip synth: error: {problem}", file=sys.stderr)
        return 2
    if args.what == "coco-panoptic":
        return synth_coco_panoptic_main(args)
    paths = write_images(args.out, count=args.count, size=(args.height, args.width), seed=args.seed)
    print(f"wrote {len(paths)} image(s) to {args.out}")
    return 0
