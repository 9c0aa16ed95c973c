"""Numerical parity with the reference implementation (tests/fixtures/parity, see its README).

The paper's model (ConvNeXt-Large CLIP, 250 queries) with the fixture's deterministic weights, on the fixture's
image and vocabulary: every stored tensor of the reference must be reproduced within the tolerance its README
gives (parsed from the README's table, so the spec and the test cannot drift apart).
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from fcclip.config import load_config
from fcclip.model import build_fcclip
from fcclip.predictor import Predictor, pad_batch
from fcclip.text import PROMPT_TEMPLATES, TextClassifierCache, encode_vocabulary
from fcclip.vocabulary import Vocabulary

PARITY = Path(__file__).parent / "fixtures" / "parity"
sys.path.insert(0, str(PARITY.parent))
from deterministic_fill import fill_  # noqa: E402  (the fixture's weight rule, as the reference used it)

pytestmark = pytest.mark.slow


def tolerances() -> dict[str, tuple[float, float]]:
    """{tensor: (atol, rtol)} from the README's tolerance table."""
    out = {}
    for line in (PARITY / "README.md").read_text().splitlines():
        m = re.match(r"\| `(\w+)` \|.*\| ([^|]+) \|$", line)
        if not m:
            continue
        tol = m.group(2).strip()
        if tol == "exact":
            out[m.group(1)] = (0.0, 0.0)
            continue
        a = re.search(r"atol ([0-9.e+-]+)", tol)
        r = re.search(r"rtol ([0-9.e+-]+)", tol)
        if a:
            out[m.group(1)] = (float(a.group(1)), float(r.group(1)) if r else 0.0)
    return out


TOL = tolerances()


def assert_close(name, ours, ref):
    atol, rtol = TOL[name]
    ours = torch.as_tensor(ours).float().cpu()
    ref = torch.as_tensor(np.asarray(ref, dtype=np.float32))
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    excess = (ours - ref).abs() - (atol + rtol * ref.abs())
    worst = excess.max().item()
    assert worst <= 0, f"{name}: exceeds tolerance (atol {atol}, rtol {rtol}) by {worst:.3g}"


@pytest.fixture(scope="module")
def ref():
    data = np.load(PARITY / "fixture.npz")
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def meta():
    return json.loads((PARITY / "fixture.json").read_text())


@pytest.fixture(scope="module")
def vocabulary(meta):
    classes = meta["vocabulary"]["classes"]
    return Vocabulary.from_dict(
        {"name": "parity", "categories": [{"id": c["id"], "names": c["names"], "isthing": c["isthing"]} for c in classes]}
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_fcclip(load_config("fcclip-convnext-large")).eval()
    fill_(m)
    return m


def test_tolerance_table_was_read():
    for name in ("backbone_res2", "decoder_pred_logits", "final_cls_logprobs", "sem_seg_max", "in_vocab_logit_scale"):
        assert name in TOL
    assert len(TOL) == 24  # every row of the table


@pytest.fixture(scope="module")
def text_embeddings(model, vocabulary):
    return encode_vocabulary(model.backbone, vocabulary)


def test_text_classifier(model, text_embeddings, ref, vocabulary, meta):
    assert [len(s) for s in vocabulary.synonyms] == list(ref["num_templates"])
    void = torch.nn.functional.normalize(model.void_embedding.weight, dim=-1)
    assert_close("text_classifier", torch.cat([text_embeddings, void]), ref["text_classifier"])


@pytest.fixture(scope="module")
def predictor(model, vocabulary, text_embeddings, tmp_path_factory):
    # the embeddings computed above, handed over through the cache (as a second image would find them)
    cache = TextClassifierCache(tmp_path_factory.mktemp("text"))
    cache.put(cache.key(model.backbone, vocabulary, PROMPT_TEMPLATES), text_embeddings)
    return Predictor(model, vocabulary, short_edge=None, text_cache=cache)


@pytest.fixture(scope="module")
def image():
    return np.asarray(Image.open(PARITY / "image.png").convert("RGB"))


@pytest.fixture(scope="module")
def outputs(predictor, image):
    decoded = predictor.preprocess(image)
    out, sizes, padded = predictor.infer([decoded])
    return out, sizes, padded


def test_category_overlap(predictor, ref):
    assert predictor.text.seen.long().tolist() == ref["category_overlapping_mask"].tolist()


def test_preprocessing_pads_to_32(outputs, meta):
    _, sizes, padded = outputs
    assert sizes == [(meta["image"]["height"], meta["image"]["width"])]
    assert padded == (meta["image"]["padded_height"], meta["image"]["padded_width"])


def test_backbone(outputs, ref):
    feats = outputs[0].raw.features
    for name in ("res2", "res3", "res4", "res5", "clip_vis_dense"):
        assert_close(f"backbone_{name}", feats[name], ref[f"backbone_{name}"])


def test_logit_scales(model, ref):
    in_scale = torch.clamp(model.sem_seg_head.predictor.logit_scale.exp(), max=100)
    out_scale = torch.clamp(model.backbone.logit_scale.exp(), max=100)
    assert in_scale.item() == pytest.approx(float(ref["in_vocab_logit_scale"]), abs=0)
    assert out_scale.item() == pytest.approx(float(ref["out_vocab_logit_scale"]), abs=0)


def test_pixel_decoder(model, outputs, ref):
    with torch.inference_mode():
        pd = model.sem_seg_head.pixel_decoder(outputs[0].raw.features)
    assert_close("pixel_decoder_mask_features", pd.mask_features, ref["pixel_decoder_mask_features"])
    for i in range(3):
        assert_close(f"pixel_decoder_multi_scale_{i}", pd.multi_scale[i], ref[f"pixel_decoder_multi_scale_{i}"])


def test_pixel_decoder_under_bf16_autocast(model, outputs, ref):
    """Under bf16 autocast (what --bf16 runs) the pixel decoder computes in float32, as the reference: its outputs
    from the same features are the reference's float32 ones within the fixture's tolerances."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        pd = model.sem_seg_head.pixel_decoder(outputs[0].raw.features)
    assert pd.mask_features.dtype == torch.float32
    assert_close("pixel_decoder_mask_features", pd.mask_features, ref["pixel_decoder_mask_features"])
    for i in range(3):
        assert_close(f"pixel_decoder_multi_scale_{i}", pd.multi_scale[i], ref[f"pixel_decoder_multi_scale_{i}"])


@pytest.fixture(scope="module")
def forward_with_aux(model, predictor, image):
    """The forward as training runs it: every decoder head's outputs (inference computes only the last one's)."""
    t = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float()
    batch = pad_batch([model.normalize(t)], model.config.inference.size_divisibility)
    with torch.inference_mode():
        return model.forward(batch, predictor.text, aux=True)


@pytest.mark.parametrize("path", ["inference", "with_aux"])
def test_transformer_decoder(outputs, forward_with_aux, ref, path):
    raw = outputs[0].raw if path == "inference" else forward_with_aux
    assert_close("decoder_pred_logits", raw.class_logits, ref["decoder_pred_logits"])
    assert_close("decoder_pred_masks", raw.mask_logits, ref["decoder_pred_masks"])
    signs = (raw.mask_logits > 0).numpy() == (ref["decoder_pred_masks"].astype(np.float32) > 0)
    assert signs.mean() == 1.0


def test_transformer_decoder_aux_heads(outputs, forward_with_aux, ref):
    assert outputs[0].raw.aux == []  # inference skips them
    assert len(forward_with_aux.aux) == ref["decoder_aux_pred_logits"].shape[0]
    for i, (cls, _) in enumerate(forward_with_aux.aux):
        assert_close("decoder_aux_pred_logits", cls, ref["decoder_aux_pred_logits"][i])


def test_out_of_vocabulary_branch_and_ensemble(outputs, ref):
    out = outputs[0]
    assert_close("out_vocab_logits", out.out_vocab_logits, ref["out_vocab_logits"])
    assert_close("in_vocab_probs", out.ensemble.in_vocab_probs, ref["in_vocab_probs"])
    assert_close("out_vocab_probs", out.ensemble.out_vocab_probs, ref["out_vocab_probs"])
    assert_close("is_void_prob", out.ensemble.void_probs, ref["is_void_prob"])
    assert_close("final_cls_probs", out.ensemble.probs, ref["final_cls_probs"])
    assert_close("final_cls_logprobs", out.class_logits, ref["final_cls_logprobs"])


def test_pooled_clip_embedding(model, outputs, ref):
    out = outputs[0]
    dense = out.raw.features["clip_vis_dense"]
    small = torch.nn.functional.interpolate(out.mask_logits, size=dense.shape[-2:], mode="bilinear", align_corners=False)
    assert_close("pooled_clip_embedding", model.backbone.pooled_embeddings(dense, small), ref["pooled_clip_embedding"])


@pytest.fixture(scope="module")
def prediction(predictor, outputs, image):
    out, sizes, padded = outputs
    predictor.semantic_scores = True
    try:
        return predictor.postprocess(out.class_logits[0], out.mask_logits[0], sizes[0], padded, image.shape[:2])
    finally:
        predictor.semantic_scores = False


def test_semantic(prediction, ref):
    scores = torch.from_numpy(prediction.semantic.scores)
    top2 = scores.topk(2, dim=0).values
    assert_close("sem_seg_max", top2[0], ref["sem_seg_max"])
    assert_close("sem_seg_top2_margin", top2[0] - top2[1], ref["sem_seg_top2_margin"])
    decided = ref["sem_seg_top2_margin"] > 1e-6
    assert decided.mean() > 0.3
    np.testing.assert_array_equal(prediction.semantic.class_map[decided], ref["sem_seg_argmax"][decided])


def test_panoptic(prediction, ref, meta):
    np.testing.assert_array_equal(prediction.panoptic.segment_map, ref["panoptic_seg"])
    ours = [(s["id"], s["class_index"], s["is_thing"]) for s in prediction.panoptic.segments]
    theirs = [(s["id"], s["category_id"], s["isthing"]) for s in meta["segments_info"]]
    assert ours == theirs
    for s in prediction.panoptic.segments:
        assert s["area"] == int((ref["panoptic_seg"] == s["id"]).sum())


def test_instances(prediction, ref, meta):
    inst = prediction.instances
    np.testing.assert_array_equal(inst.classes, ref["instance_classes"])
    np.testing.assert_allclose(inst.scores, ref["instance_scores"], atol=2e-5, rtol=0)
    for mask, expected in zip(inst.masks, meta["instances"]):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle["counts"].decode("ascii") == expected["mask_rle"]["counts"]
