"""``fcclip models``: the model presets, their CLIP and whether a released checkpoint exists (imports no PyTorch)."""
from __future__ import annotations

import argparse

from fcclip.config import list_models, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass  # no options


def main_args(args: argparse.Namespace) -> int:
    for name in list_models():
        cfg = load_config(name)
        released = "released checkpoint (downloaded)" if cfg.weights.url else "no download address (--weights PATH)"
        print(f"{name:24s} CLIP {cfg.clip.model_name:24s} {released}")
    return 0
