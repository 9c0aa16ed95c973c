"""The released checkpoints' state-dict keys and shapes map one to one onto our modules (both ways)."""
from pathlib import Path

import pytest
import torch

from fcclip.checkpoint import IGNORED_KEYS
from fcclip.config import load_config
from fcclip.model import build_fcclip

FIXTURES = Path(__file__).parent / "fixtures"

# released state dict (TSV from the reference) -> our preset
PRESETS = {
    "convnext_large_d_320": "fcclip-convnext-large",
    "convnext_base": "fcclip-convnext-base",
    "RN50": "fcclip-rn50",
    "RN101": "fcclip-rn101",
    "RN50x4": "fcclip-rn50x4",
    "RN50x16": "fcclip-rn50x16",
    "RN50x64": "fcclip-rn50x64",
}


def read_tsv(name):
    rows = {}
    with open(FIXTURES / f"fcclip_{name}_state_dict.tsv") as f:
        header = f.readline().rstrip("\n").split("\t")
        assert header == ["key", "shape", "dtype", "numel", "kind"]
        for line in f:
            key, shape, dtype, numel, kind = line.rstrip("\n").split("\t")
            rows[key] = (tuple(int(s) for s in shape.split(",")) if shape else (), kind)
    return rows


@pytest.mark.parametrize("tsv", sorted(PRESETS))
def test_official_keys_map_onto_our_model(tsv):
    official = read_tsv(tsv)
    with torch.device("meta"):
        model = build_fcclip(load_config(PRESETS[tsv]))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    params = {k for k, _ in model.named_parameters()}

    # every official key is either one of ours (same shape) or an explicitly ignored training buffer
    for key, (shape, kind) in official.items():
        if key in IGNORED_KEYS:
            assert kind == "buffer", key
            continue
        assert key in ours, f"official key {key} has no counterpart"
        assert ours[key] == shape, f"{key}: ours {ours[key]} vs official {shape}"
        assert (key in params) == (kind == "param"), f"{key}: param/buffer kind differs"
    # and every one of ours comes from the official checkpoint
    leftover = sorted(set(ours) - set(official))
    assert not leftover, leftover
    assert set(official) - set(ours) == set(IGNORED_KEYS) & set(official)


def test_criterion_buffer_matches_the_training_vocabulary():
    official = read_tsv("convnext_large_d_320")
    assert official["criterion.empty_weight"][0] == (load_config("fcclip-convnext-large").weights.num_train_classes + 1,)
