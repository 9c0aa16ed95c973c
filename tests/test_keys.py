"""The released checkpoints' state dicts load into our models through the loader every checkpoint goes through
(`fcclip.checkpoint.load_weights`), and that loader refuses a key missing, left over or of the wrong shape.

The key lists (names, shapes, dtypes, parameter or buffer) were taken from the seven released .pth files with the
reference implementation; `tests/fixtures/fcclip_*_state_dict.tsv` are those lists. Models are built on the meta
device and the state dicts are meta tensors of the listed shapes and dtypes, so the full-size models cost no memory
and no time, while the loading code path is the real one (`check_state_dict` then `nn.Module.load_state_dict`,
strict).
"""
from pathlib import Path

import pytest
import torch

from fcclip.checkpoint import IGNORED_KEYS, CheckpointError, load_weights
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
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def read_tsv(name):
    """{key: (shape, dtype, "param" | "buffer")} of a released checkpoint."""
    rows = {}
    with open(FIXTURES / f"fcclip_{name}_state_dict.tsv") as f:
        header = f.readline().rstrip("\n").split("\t")
        assert header == ["key", "shape", "dtype", "numel", "kind"]
        for line in f:
            key, shape, dtype, numel, kind = line.rstrip("\n").split("\t")
            dims = tuple(int(s) for s in shape.split(",")) if shape else ()
            assert int(numel) == (torch.Size(dims).numel()), key
            rows[key] = (dims, DTYPES[dtype], kind)
    return rows


def released_state_dict(rows):
    """The released checkpoint's state dict, as meta tensors of its shapes and dtypes."""
    return {key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype, _) in rows.items()}


def meta_model(preset):
    with torch.device("meta"):
        return build_fcclip(load_config(preset))


@pytest.fixture(scope="module", params=sorted(PRESETS))
def released(request):
    """(TSV name, our model of its preset on the meta device, the released key list)."""
    return request.param, meta_model(PRESETS[request.param]), read_tsv(request.param)


def test_released_checkpoint_loads_through_the_checkpoint_loader(released):
    name, model, rows = released
    assert load_weights(model, released_state_dict(rows)) is model
    ours = dict(model.state_dict())
    params = {k for k, _ in model.named_parameters()}
    for key, (shape, dtype, kind) in rows.items():
        if key in IGNORED_KEYS:  # the training criterion's buffer: not part of the model, dropped on load
            assert kind == "buffer" and key not in ours, key
            continue
        assert ours[key].dtype == dtype, f"{key}: ours {ours[key].dtype} vs released {dtype}"
        assert (key in params) == (kind == "param"), f"{key}: parameter/buffer differs"
    assert set(ours) == set(rows) - set(IGNORED_KEYS)


def test_a_missing_key_is_refused(released):
    name, model, rows = released
    state = released_state_dict(rows)
    key = sorted(k for k in state if k.startswith("sem_seg_head."))[0]
    del state[key]
    with pytest.raises(CheckpointError, match=rf"missing: {key.replace('.', '[.]')}\b"):
        load_weights(model, state)


def test_a_left_over_key_is_refused(released):
    name, model, rows = released
    state = released_state_dict(rows)
    state["sem_seg_head.predictor.extra_head.weight"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError, match=r"unexpected: sem_seg_head[.]predictor[.]extra_head[.]weight"):
        load_weights(model, state)


def test_a_wrongly_shaped_key_is_refused(released):
    name, model, rows = released
    state = released_state_dict(rows)
    key = "sem_seg_head.predictor.query_embed.weight"
    queries, width = rows[key][0]
    state[key] = torch.empty(queries - 50, width, device="meta")  # a checkpoint with 200 queries
    with pytest.raises(CheckpointError, match=rf"wrong shape: {key.replace('.', '[.]')}: checkpoint \({queries - 50}, "
                                              rf"{width}\) vs model \({queries}, {width}\)"):
        load_weights(model, state)


def test_the_refusal_names_every_fault_at_once():
    rows = read_tsv("convnext_large_d_320")
    model = meta_model("fcclip-convnext-large")
    state = released_state_dict(rows)
    del state["sem_seg_head.predictor.class_embed.layers.0.weight"]
    state["backbone.unknown"] = torch.empty(1, device="meta")
    state["sem_seg_head.predictor.level_embed.weight"] = torch.empty(2, 256, device="meta")
    with pytest.raises(CheckpointError) as info:
        load_weights(model, state)
    message = str(info.value)
    for part in ("missing: sem_seg_head.predictor.class_embed.layers.0.weight", "unexpected: backbone.unknown",
                 "wrong shape: sem_seg_head.predictor.level_embed.weight: checkpoint (2, 256) vs model (3, 256)"):
        assert part in message


def test_criterion_buffer_matches_the_training_vocabulary():
    official = read_tsv("convnext_large_d_320")
    assert official["criterion.empty_weight"][0] == (load_config("fcclip-convnext-large").weights.num_train_classes + 1,)
