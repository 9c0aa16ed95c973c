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
import html
import http.client
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

import fsspec
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._paths import cache_dir, new_file

logger = logging.getLogger(__name__)

IGNORED_KEYS = ("criterion.empty_weight",)
NO_OBJECT_WEIGHT = 0.1


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def fetch(uri: str, directory: str | Path | None = None) -> Path:
    """A local path for ``uri``: local files as they are; remote ones downloaded once into the weights cache.

    Remote files are written under a temporary name and renamed when complete, so an interrupted or refused
    download never leaves a partial checkpoint in the cache. Over http(s), an answer that is an HTML page (a quota,
    sign-in or virus-scan page instead of the file) or shorter than its Content-Length is a CheckpointError that
    names the URL and what arrived.
    """
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if not _is_remote(uri):
        path = Path(uri).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path
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
    try:
        with os.fdopen(fd, "wb") as out:
            if uri.startswith(("http://", "https://")):
                _download_http(uri, out)
            else:
                with fsspec.open(uri, "rb") as src:
                    shutil.copyfileobj(src, out, _CHUNK)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        try:
            target.parent.rmdir()  # nothing of a failed download stays, nor its empty folder
        except OSError:  # another download of the same URI is writing there
            pass
        raise
    return target


_CHUNK = 1 << 22
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")


def _download_http(url: str, out) -> None:
    """Stream ``url`` into ``out``, refusing HTML pages and answers shorter than their Content-Length."""
    shown = _redact(url)
    request = urllib.request.Request(url, headers={"User-Agent": "fcclip"})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(f"checkpoint not found: {shown} (HTTP 404)") from None
        raise CheckpointError(f"downloading {shown}: the server answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise CheckpointError(f"downloading {shown}: {e.reason}") from None
    with response:
        content_type = response.headers.get("Content-Type", "")
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        while True:
            try:
                chunk = response.read(_CHUNK)
            except http.client.IncompleteRead as e:  # chunked transfer cut short
                raise CheckpointError(_truncated_message(shown, received + len(e.partial), expected)) from None
            if not chunk:
                break
            if not received and _is_html(content_type, chunk):
                raise CheckpointError(_html_message(shown, content_type, chunk[:65536]))
            out.write(chunk)
            received += len(chunk)
    if expected is not None and received != expected:
        raise CheckpointError(_truncated_message(shown, received, expected))
    if not received:
        raise CheckpointError(f"downloading {shown}: the server sent an empty answer ({content_type or 'no type'})")


def _is_html(content_type: str, first: bytes) -> bool:
    return "html" in content_type.lower() or first.lstrip()[:16].lower().startswith(_HTML_STARTS)


def _truncated_message(url: str, received: int, expected: int | None) -> str:
    of = f" of {expected:,} bytes (its Content-Length)" if expected is not None else " bytes, before the end"
    return f"downloading {url}: the connection ended after {received:,}{of}; nothing was cached, try again"


def _html_message(url: str, content_type: str, body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
    if title:
        what = f"an HTML page titled {html.unescape(' '.join(title.group(1).split()))!r}"
    else:
        what = f"an HTML page starting {' '.join(text[:120].split())!r}"
    return (
        f"downloading {url}: the server sent {what} ({content_type or 'no Content-Type'}), not a checkpoint: "
        "typically a quota, sign-in or confirmation page. Download the file in a browser and pass its path as the "
        "weights; nothing was cached"
    )


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
    fd, tmp = new_file(path.parent, ".part")  # the umask's permissions, not mkstemp's 0o600
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            save_file(state, tmp)
        else:
            torch.save({"model": state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
