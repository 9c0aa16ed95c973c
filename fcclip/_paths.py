"""Where the package finds its data files and its cache.

The model presets (``configs/models``), training configs (``configs/train``) and builtin vocabularies
(``configs/vocabularies``) are package data: they sit inside the installed ``fcclip`` package, so a wheel, a
``pip install .`` and an editable checkout all find them the same way.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def config_dir() -> Path:
    """The package's ``configs/`` folder (model presets, training configs, builtin vocabularies)."""
    path = Path(str(resources.files("fcclip").joinpath("configs")))
    if not path.is_dir():  # a broken install (package data left out of the wheel)
        raise FileNotFoundError(f"fcclip's package data is missing: no folder {path}; reinstall fcclip")
    return path


def cache_dir() -> Path:
    """Cache for downloaded weights and text embeddings: `$FCCLIP_CACHE`, else `$XDG_CACHE_HOME/fcclip`."""
    env = os.environ.get("FCCLIP_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fcclip"
