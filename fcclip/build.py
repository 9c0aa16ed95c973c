"""build_model: a preset (or config) plus weights -> a ready FCCLIP model."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint import fetch, load_weights, read_state_dict, sha256_file
from .config import ConfigError, ModelConfig, load_config
from .model import FCCLIP, build_fcclip
from .random_weights import fill_

logger = logging.getLogger(__name__)

WEIGHT_MODES = ("official", "clip", "random")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_model(
    model: str | Path | ModelConfig = "fcclip-convnext-large",
    weights: str | Path | Mapping[str, torch.Tensor] = "official",
    device: str | torch.device | None = None,
    compile: bool | Mapping[str, object] = False,
) -> FCCLIP:
    """Build FC-CLIP and load its weights.

    Args:
        model: a preset name (see :func:`fcclip.list_models`), a preset-format YAML path, or a ModelConfig.
        weights:
            ``"official"`` (default): the released FC-CLIP checkpoint of the preset, downloaded once and cached
            (it holds the CLIP weights too, nothing else is downloaded);
            ``"clip"``: open_clip's pretrained CLIP (downloaded) with an untrained head, the start of training;
            ``"random"``: deterministic random weights, for offline smoke runs (labels are meaningless);
            a path or URI (local, http(s)://, s3://, gs://) of a .pth / .safetensors checkpoint, or a state dict.
        device: "cpu", "cuda", "cuda:1", ...; default: CUDA when available.
        compile: compile the backbone and both decoders with ``torch.compile`` (:meth:`FCCLIP.compile_parts`);
            a mapping passes its items as ``torch.compile`` options. The first image of each size pays the
            compilation.
    Returns:
        the model in eval mode; ``model.weights_id`` says which weights it holds (for provenance).
    """
    config = load_config(model)
    if config.head.hidden_dim != config.head.conv_dim:
        raise ConfigError(
            f"{config.name}: head.hidden_dim ({config.head.hidden_dim}) must equal head.conv_dim ({config.head.conv_dim})"
        )
    if isinstance(weights, str) and weights == "clip":
        net = build_fcclip(config, clip_pretrained=True)
        weights_id = f"clip:{config.clip.model_name}/{config.clip.pretrained}"
        warnings.warn(f"{config.name}: CLIP weights only; the segmentation head is untrained", stacklevel=2)
    else:
        net = build_fcclip(config)
        if isinstance(weights, str) and weights == "random":
            fill_(net)
            weights_id = "random"
            warnings.warn(
                f"{config.name}: random weights; masks and labels are meaningless (use them for smoke runs only)",
                stacklevel=2,
            )
        elif isinstance(weights, Mapping):
            load_weights(net, weights)
            weights_id = "state_dict"
        else:
            source = str(weights)
            if source == "official":
                if not config.weights.url:
                    raise ConfigError(
                        f"{config.name}'s preset has no checkpoint to download: pass weights=PATH_OR_URI (a "
                        "checkpoint you trained) or weights='random' for a smoke run"
                    )
                source = config.weights.url
            path = fetch(source)
            digest = sha256_file(path)
            if source == config.weights.url and config.weights.sha256 and digest != config.weights.sha256:
                raise ValueError(f"{path}: sha256 {digest} does not match the preset's {config.weights.sha256}")
            load_weights(net, read_state_dict(path))
            weights_id = f"sha256:{digest}"
    net.weights_id = weights_id
    net = net.to(resolve_device(device)).eval()
    if compile:
        net.compile_parts(**(dict(compile) if isinstance(compile, Mapping) else {}))
    return net
