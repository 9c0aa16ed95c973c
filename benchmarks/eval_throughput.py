"""Evaluation images/s next to labeling images/s, same model, same images, same test size.

    python benchmarks/eval_throughput.py --model fcclip-tiny --images 24 --size 320

Writes a synthetic COCO-panoptic validation set (`fcclip synth coco-panoptic`), then runs `fcclip eval` on it and
`fcclip label` on its images, each as a subprocess with its own local Ray, and prints both rates. Evaluation does
more per image (semantic and instance post-processing, ground truth loading, metric updates) than labeling
(panoptic only, RLE encoding); both include their Ray start-up in the end-to-end rate.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - start, proc.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fcclip-tiny")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--size", type=int, default=320, help="synthetic images are size x size*4/3; test short edge")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    args = p.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="fcclip-evalbench-") as tmp:
        root = Path(tmp) / "coco"
        h, w = args.size, args.size * 4 // 3
        subprocess.run([py, "-m", "fcclip_pipelines", "synth", "coco-panoptic", "--out", str(root), "--images", "1",
                        "--size", str(h), str(w)], check=True, capture_output=True, cwd=REPO)
        # the validation split with the requested number of images
        from fcclip.datasets.synthetic_panoptic import write_coco_panoptic

        write_coco_panoptic(root, 1, seed=1, size=(h, w), num_val=args.images)
        common = ["--model", args.model, "--weights", "random", "--num-cpus", str(args.num_cpus), "--no-progress"]
        sizes = ["--short-edge", str(h), "--max-size", str(w)]
        t_eval, out_eval = run([py, "-m", "fcclip_pipelines", "eval", "--dataset", "coco_panoptic", "--data", str(root),
                                "--out", f"{tmp}/eval.json", *common, *sizes])
        t_label, out_label = run([py, "-m", "fcclip_pipelines", "label", str(root / "val2017"), "--out", f"{tmp}/labels",
                                  "--vocab", "coco_panoptic", "--summary-json", f"{tmp}/label.json", *common, *sizes])
        ev = json.loads(Path(f"{tmp}/eval.json").read_text())
        lab = json.loads(Path(f"{tmp}/label.json").read_text())
    print(f"# {args.model}, {args.images} images of {h}x{w}, local Ray with {args.num_cpus} CPUs")
    print("| job | images | images/s (job's own clock) | wall s (command) |")
    print("|---|---|---|---|")
    print(f"| fcclip eval (PQ + AP + mIoU) | {ev['images']} | {ev['images_per_s']:.2f} | {t_eval:.1f} |")
    print(f"| fcclip label (panoptic + RLE) | {lab['images']} | {lab['images_per_second']:.2f} | {t_label:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
