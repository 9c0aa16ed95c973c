"""Checkpoints: the released FC-CLIP .pth files, our own, and safetensors; from local paths, http(s) or object storage.

Key mapping. Our modules carry exactly the reference's parameter names, so the mapping from an official state dict
to ours is the identity on every model key. The one other entry of the official files is the training criterion's
buffer ``criterion.empty_weight`` (per-class loss weights: 1 for each of the 133 COCO classes, 0.1 for "no object"):
it is not part of the model, is dropped when loading, and is written back when saving in the official format, so our
checkpoints load into the reference too. Anything else missing, left over or of the wrong shape is an error that
names the key.

Checkpoints are untrusted input: ``torch.load(..., weights_only=True)`` only ever builds tensors and plain
containers, never arbitrary objects.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ._paths import cache_dir

logger = logging.getLogger(__name__)

IGNORED_KEYS = ("criterion.empty_weight",)
NO_OBJECT_WEIGHT = 0.1


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def fetch(uri: str, directory: str | Path | None = None) -> Path:
    """A local path for ``uri``: local files as they are; remote ones downloaded once into the weights cache.

    Remote files are written under a temporary name and renamed when complete, so an interrupted download never
    leaves a truncated checkpoint behind.
    """
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if not _is_remote(uri):
        path = Path(uri).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path
    import fsspec

    directory = Path(directory) if directory is not None else cache_dir() / "weights"
    name = uri.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "checkpoint"
    if not name.endswith((".pth", ".pt", ".safetensors", ".bin")):
        name += ".pth"
    target = directory / hashlib.sha256(uri.encode()).hexdigest()[:16] / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", _redact(uri), target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    # http(s): stream (servers such as Google Drive's do not answer range requests)
    options = {"block_size": 0} if uri.startswith(("http://", "https://")) else {}
    try:
        with os.fdopen(fd, "wb") as out, fsspec.open(uri, "rb", **options) as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _redact(uri: str) -> str:
    """The URI without a query string (signed URLs carry credentials there)."""
    return uri.split("?", 1)[0]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a .pth/.pt (``{"model": state_dict}`` as the reference saves, or a bare state dict)
    or a .safetensors file, local or remote."""
    path = fetch(str(source))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: {e}). Checkpoints "
            "are loaded without unpickling arbitrary objects; re-save the state dict alone "
            "(torch.save({'model': model.state_dict()}, path)) or convert it to .safetensors"
        ) from e
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return dict(obj)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` that the model takes; raises CheckpointError naming every key that is missing,
    left over or of the wrong shape."""
    state = {k: v for k, v in state_dict.items() if k not in IGNORED_KEYS}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError("checkpoint does not fit the model; " + "; ".join(parts))
    return state


def load_weights(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a full FC-CLIP checkpoint into ``model`` strictly (every key, every shape)."""
    state = read_state_dict(source) if not isinstance(source, Mapping) else source
    model.load_state_dict(check_state_dict(model, state), strict=True)
    return model


def official_state_dict(model: nn.Module, num_train_classes: int = 133) -> dict[str, torch.Tensor]:
    """The model's state dict in the reference's layout, including the criterion buffer."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    empty_weight = torch.ones(num_train_classes + 1)
    empty_weight[-1] = NO_OBJECT_WEIGHT
    state["criterion.empty_weight"] = empty_weight
    return state


def save_checkpoint(model: nn.Module, path: str | Path, num_train_classes: int = 133) -> Path:
    """Save as the reference does (``{"model": state_dict}`` .pth) or as .safetensors (by the suffix); atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = official_state_dict(model, num_train_classes)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp)
        else:
            torch.save({"model": state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
