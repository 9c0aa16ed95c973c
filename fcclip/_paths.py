"""Where the package finds its data files (model presets, builtin vocabularies)."""
from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    """The `configs/` folder: `$FCCLIP_CONFIG_DIR` if set, else the one beside the package in the repository."""
    env = os.environ.get("FCCLIP_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "configs"
    if not path.is_dir():
        raise FileNotFoundError(
            f"fcclip config folder not found at {path}; install the package from its repository "
            "(pip install -e .) or set FCCLIP_CONFIG_DIR to the repository's configs/ folder"
        )
    return path


def cache_dir() -> Path:
    """Cache for downloaded weights and text embeddings: `$FCCLIP_CACHE`, else `$XDG_CACHE_HOME/fcclip`."""
    env = os.environ.get("FCCLIP_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fcclip"
