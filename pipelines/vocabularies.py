"""``fcclip vocabularies``: the builtin vocabularies with their numbers of classes and of thing classes."""
from __future__ import annotations

import argparse

from fcclip.vocabulary import list_vocabularies, load_vocabulary


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass  # no options


def main_args(args: argparse.Namespace) -> int:
    for name in list_vocabularies():
        v = load_vocabulary(name)
        print(f"{name:20s} {len(v)} classes, {sum(v.thing_mask)} things")
    return 0
