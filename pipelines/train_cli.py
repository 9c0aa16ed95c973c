"""`fcclip train`'s arguments, and its start: the config is found before the training module is imported (PyTorch,
Ray Train, open_clip: about 8 s here), so a mistyped --config is refused at once. The training itself is
:mod:`fcclip_pipelines.train`."""
from __future__ import annotations

import argparse
import sys

from fcclip.config import ConfigError, train_config_path
from fcclip_pipelines import runtime
from fcclip_pipelines.arguments import COUNT, SCORE, number


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="a packaged training config's name (fcclip-convnext-large-coco, fcclip-tiny-synthetic) or a "
                        "YAML file")
    p.add_argument("--data", required=True,
                   help="a COCO panoptic tree or a labeling output of fcclip label (local or s3://...; detected)")
    p.add_argument("--storage", required=True, help="where checkpoints and metrics go (local folder or s3://...)")
    p.add_argument("--version", type=number(int, minimum=0), default=None, metavar="N",
                   help="train on version N of the labeling output's table (default: the current one; with "
                   "--resume, the one the run started on)")
    p.add_argument("--name", default=None, help="run name (default: the config's)")
    p.add_argument("--num-workers", type=COUNT, default=1,
                   help="training workers (DDP ranks; the config's global batch is split across them; default: 1)")
    runtime.add_gpu_arguments(p, "--gpus-per-worker", "training worker", "trains on CPU (gloo)", "every worker's GPU")
    p.add_argument("--cpus-per-worker", type=number(minimum=0), default=1.0,
                   help="CPUs each training worker asks for, beside its GPUs (default: %(default)g)")
    p.add_argument("--max-iters", type=COUNT, default=None, help="override the config's iteration count")
    p.add_argument("--resume", action="store_true", help="continue the run stored under --storage/NAME")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=COUNT, default=None, help="CPUs of the local Ray (default: all)")
    g = p.add_argument_group("pseudo-labels (when --data is a labeling output)")
    g.add_argument("--min-score", type=SCORE, default=0.0,
                   help="segments scoring below this become ignore regions (not background)")
    g.add_argument("--class-map", action="append", default=[], metavar="OLD=NEW",
                   help="train the run's class OLD (name or id) as NEW: an existing class (merged) or a new name; "
                        "repeatable")
    g.add_argument("--keep", default="", metavar="NAMES", help="train only these classes (';'-separated, after "
                                                                "--class-map)")
    g.add_argument("--drop", default="", metavar="NAMES",
                   help="leave these classes out (';'-separated, after --class-map); their pixels are background")
    p.add_argument("--mix", default=None, metavar="KIND=URI:SHARE",
                   help="also train on a source of the other kind, SHARE (0-1) of the samples: coco=ROOT:0.5 with "
                        "--data a labeling output, labels=DEST:0.3 with --data a COCO tree; the training vocabulary "
                        "is the union of both (classes with a name in common are one class, --data's)")


def main_args(args: argparse.Namespace) -> int:
    try:
        train_config_path(args.config)
    except (ConfigError, FileNotFoundError) as e:
        print(f"fcclip train: error: {e}", file=sys.stderr)
        return 2
    from fcclip_pipelines import train

    return train.main_args(args)
