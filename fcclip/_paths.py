"""Where the package finds its data files and its cache.

The model presets (``configs/models``), training configs (``configs/train``) and builtin vocabularies
(``configs/vocabularies``) live in the repository's top-level ``configs/`` folder, which an install ships as package
data inside the ``fcclip`` package (``fcclip/configs``, pyproject.toml's package-dir mapping). An installed wheel
finds them there; a checkout (an editable install, or ``fcclip`` imported from the repository) beside the package.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def config_dir() -> Path:
    """The ``configs/`` folder (model presets, training configs, builtin vocabularies): ``fcclip/configs`` in an
    installed wheel, the repository's ``configs/`` in a checkout."""
    package = Path(str(resources.files("fcclip")))
    for path in (package / "configs", package.parent / "configs"):
        if (path / "models").is_dir():
            return path
    # a broken install (package data left out of the wheel)
    raise FileNotFoundError(f"fcclip's package data is missing: no folder {package / 'configs'}; reinstall fcclip")


def cache_dir() -> Path:
    """Cache for downloaded weights and text embeddings: `$FCCLIP_CACHE`, else `$XDG_CACHE_HOME/fcclip`."""
    env = os.environ.get("FCCLIP_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fcclip"
