"""FC-CLIP open-vocabulary panoptic segmentation in pure PyTorch.

    import fcclip
    model = fcclip.build_model("fcclip-convnext-large")
    predictor = fcclip.Predictor(model, vocabulary="ade20k_150")
    result = predictor(image)

Names are imported on first use, so ``import fcclip.vocabulary`` (say) does not load the model stack.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "fcclip.build",
    "Predictor": "fcclip.predictor",
    "Prediction": "fcclip.predictor",
    "ModelConfig": "fcclip.config",
    "list_models": "fcclip.config",
    "load_config": "fcclip.config",
    "Vocabulary": "fcclip.vocabulary",
    "list_vocabularies": "fcclip.vocabulary",
    "load_vocabulary": "fcclip.vocabulary",
    "load_image": "fcclip.images",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fcclip' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
