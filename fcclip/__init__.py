"""FC-CLIP open-vocabulary panoptic segmentation in pure PyTorch.

    import fcclip
    model = fcclip.build_model("fcclip-convnext-large")
    predictor = fcclip.Predictor(model, vocabulary="ade20k_150")
    result = predictor(image)
"""
from .build import build_model
from .config import ModelConfig, list_models, load_config
from .vocabulary import Vocabulary, list_vocabularies, load_vocabulary

__all__ = [
    "ModelConfig",
    "Vocabulary",
    "build_model",
    "list_models",
    "list_vocabularies",
    "load_config",
    "load_vocabulary",
]
__version__ = "0.1.0"
