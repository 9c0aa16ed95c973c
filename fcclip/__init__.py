"""FC-CLIP open-vocabulary panoptic segmentation in pure PyTorch."""
