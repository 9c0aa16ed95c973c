"""Typed model configs, the model presets (``configs/models``, package data) and where the packaged training
configs (``configs/train``) are found.

A preset is a small YAML file with four sections (``clip``, ``head``, ``inference``, ``weights``) that map one to one
onto the frozen dataclasses below. Unknown keys are errors, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ._paths import config_dir

CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)


class ConfigError(ValueError):
    """A model config or preset is malformed."""


@dataclass(frozen=True)
class ClipConfig:
    """The frozen open_clip CLIP model.

    model_name: open_clip architecture name (``convnext_large_d_320``, ``RN50-quickgelu``, ...).
    pretrained: open_clip pretrained tag, used only when CLIP weights are loaded on their own (``weights="clip"``).
    model_cfg: an inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...) instead of a
        named architecture; used by the tiny test model.
    """

    model_name: str
    pretrained: str | None = None
    model_cfg: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class HeadConfig:
    """Pixel decoder and masked-attention transformer decoder (Mask2Former's, as FC-CLIP configures them)."""

    conv_dim: int = 256
    mask_dim: int = 256
    norm_groups: int = 32
    encoder_layers: int = 6
    encoder_heads: int = 8
    encoder_ffn_dim: int = 1024
    encoder_points: int = 4
    num_queries: int = 250
    hidden_dim: int = 256
    decoder_layers: int = 9
    decoder_heads: int = 8
    decoder_ffn_dim: int = 2048
    pre_norm: bool = False


@dataclass(frozen=True)
class InferenceConfig:
    """Test-time settings of the reference (its ADE20K eval config)."""

    alpha: float = 0.4  # geometric-ensemble weight of the out-of-vocabulary classifier for classes seen in training
    beta: float = 0.8  # ... for classes not seen in training
    ensemble_on_valid_mask: bool = False  # ResNet CLIPs: out-of-vocabulary scores only for non-empty masks
    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.8
    topk: int = 100  # instances per image
    short_edge: int | None = 800
    max_size: int = 1333
    size_divisibility: int = 32
    pixel_mean: tuple[float, float, float] = CLIP_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = CLIP_PIXEL_STD
    train_vocabulary: str = "coco_panoptic"  # decides which classes count as seen (alpha) or unseen (beta)


@dataclass(frozen=True)
class WeightsConfig:
    """Where the released FC-CLIP checkpoint of a preset lives (None: no released checkpoint)."""

    url: str | None = None
    sha256: str | None = None
    num_train_classes: int = 133  # size of the training criterion's class weights in the checkpoint


def check_weights(config: "ModelConfig", weights: str, flag: str = "--weights") -> None:
    """Refuse, before any model is built (a cluster started, a model actor loaded), weights that cannot be loaded:
    ``official`` for a preset with no released checkpoint, or a local checkpoint path where there is no file.
    ConfigError; the other modes (clip, random) and URIs pass (a URI is fetched where the model is built)."""
    if weights == "official":
        if not config.weights.url:
            raise ConfigError(f"{config.name}'s preset has no checkpoint to download: pass {flag} PATH_OR_URI (a "
                              f"checkpoint you trained) or {flag} random for a smoke run")
    elif weights not in ("clip", "random") and "://" not in weights and not os.path.exists(os.path.expanduser(weights)):
        raise ConfigError(f"{flag} {weights}: no such checkpoint file")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    clip: ClipConfig
    head: HeadConfig = field(default_factory=HeadConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_type(value: Any, annotation: str, where: str, positive: bool) -> Any:
    """``value`` checked against a field annotated int, float, bool or str, or one of those ``| None``; other fields
    (tuples, mappings) are not checked here. Ints must be >= 1 when ``positive``; an int for a float becomes one,
    and so does a string that reads as a number."""
    names = [n.strip() for n in annotation.split("|")]
    optional = "None" in names
    names = [n for n in names if n != "None"]
    if len(names) != 1 or names[0] not in _SCALARS or (value is None and optional):
        return value
    kind = _SCALARS[names[0]]
    if kind is float and (_is_number(value) or isinstance(value, str)):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = ("an " if kind is int else "a ") + names[0] + (" or null" if optional else "")
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if positive and kind is int and value < 1:
        raise ConfigError(f"{where}: must be a positive integer, got {value}")
    return value


def build_strict(cls, data: Any, where: str, positive: bool = False):
    """A frozen config dataclass from a mapping; an unknown key, a missing field or a value of the wrong type (int,
    float, bool or str as the field says) is a ConfigError naming it; ints must be >= 1 when ``positive``.
    Lists become tuples (the dataclasses are frozen and hashable)."""
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        name = f"{where}: {key}" if where.endswith((".yaml", ".yml")) else f"{where}.{key}"  # a file, or a section
        if key in ("pixel_mean", "pixel_std"):
            if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value)):
                raise ConfigError(f"{name}: expected 3 numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        value = _check_type(value, str(names[key].type), name, positive)
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


def config_from_dict(data: Mapping[str, Any], name: str | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from the preset structure; strict about keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"model config must be a mapping, got {type(data).__name__}")
    allowed = {"name", "clip", "head", "inference", "weights"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"model config: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if "clip" not in data:
        raise ConfigError("model config: missing the 'clip' section")
    name = data.get("name") or name
    if not name:
        raise ConfigError("model config: missing 'name'")
    return ModelConfig(
        name=str(name),
        clip=build_strict(ClipConfig, data["clip"], "clip"),
        head=build_strict(HeadConfig, data.get("head"), "head", positive=True),
        inference=build_strict(InferenceConfig, data.get("inference"), "inference", positive=True),
        weights=build_strict(WeightsConfig, data.get("weights"), "weights", positive=True),
    )


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (its message spans several lines, with a snippet)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


def list_models() -> list[str]:
    """Names of the model presets (``configs/models/*.yaml``)."""
    return sorted(p.stem for p in (config_dir() / "models").glob("*.yaml"))


def list_train_configs() -> list[str]:
    """Names of the packaged training configs (``configs/train/*.yaml``)."""
    return sorted(p.stem for p in (config_dir() / "train").glob("*.yaml"))


def _resolve(spec: str | Path, kind: str, names: list[str]) -> Path:
    """A YAML file given by path, or the packaged one of that name in ``configs/<kind>``."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        raise FileNotFoundError(f"config file not found: {path}")
    packaged = config_dir() / kind / f"{spec}.yaml"
    if not packaged.is_file():
        what = "model preset" if kind == "models" else "training config"
        raise ConfigError(f"unknown {what} {str(spec)!r}: not a file, and not one of {', '.join(names)}")
    return packaged


def train_config_path(spec: str | Path) -> Path:
    """The YAML file of a training config: a path, or the name of a packaged one (``fcclip-tiny-synthetic``)."""
    return _resolve(spec, "train", list_train_configs())


def load_config(spec: str | Path | ModelConfig) -> ModelConfig:
    """A preset name (``fcclip-convnext-large``), a path to a preset-format YAML file, or a ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    path = _resolve(spec, "models", list_models())
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; a model config is YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {yaml_problem(e)}") from None
    try:
        return config_from_dict(data, name=path.stem)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
