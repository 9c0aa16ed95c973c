"""Where the package finds its data files and its cache.

The model presets (``configs/models``), training configs (``configs/train``) and builtin vocabularies
(``configs/vocabularies``) live in the repository's top-level ``configs/`` folder, which an install ships as package
data inside the ``fcclip`` package (``fcclip/configs``, pyproject.toml's package-dir mapping). An installed wheel
finds them there; a checkout (an editable install, or ``fcclip`` imported from the repository) beside the package.
"""
from __future__ import annotations

import os
import uuid
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


def new_file(directory: str | os.PathLike, suffix: str) -> tuple[int, str]:
    """A new file in ``directory``, open for writing, and its path: as ``tempfile.mkstemp`` makes one, but with the
    permissions a plain ``open`` gives (0o666 less the umask) rather than 0o600, so that a file renamed from it into
    place (a part file, a checkpoint) is readable by the other users and services a plain file would be."""
    while True:
        path = os.path.join(directory, f"tmp{uuid.uuid4().hex}{suffix}")
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:
            continue
