"""fcclip.uncertainty's signals on hand-built probabilities, and the model stage's columns (no Ray)."""
import numpy as np
import pytest
import torch

from fcclip.uncertainty import image_uncertainty, mask_signals, query_signals, segment_doubt, unlabeled_share


def test_query_signals_on_known_probabilities():
    # 2 queries, 3 classes + void
    probs = torch.tensor([[[0.6, 0.3, 0.05, 0.05], [0.2, 0.25, 0.15, 0.4]]])
    p_in = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]])
    p_out = torch.tensor([[[0.5, 0.4, 0.1], [0.8, 0.1, 0.1]]])
    margin, agree = query_signals(probs, p_in, p_out)
    assert margin.shape == agree.shape == (1, 2)
    np.testing.assert_allclose(margin[0].numpy(), [0.3, 0.05], atol=1e-6)  # void (0.4) is not a class
    assert agree[0].tolist() == [True, False]
    # one class: nothing to confuse it with
    m1, a1 = query_signals(torch.tensor([[0.9, 0.1]]), torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    assert m1.tolist() == pytest.approx([0.9]) and a1.tolist() == [True]


def test_mask_signals_on_known_masks():
    big = 20.0
    logits = torch.full((3, 4, 4), -big)
    logits[0, :2, :2] = big  # 4 sure cells
    logits[1, :, :2] = 0.4  # 8 hesitant cells (p = 0.599)
    # query 2: no cell above 0.5
    kept_pixels = torch.tensor([32, 64, 5])
    mask_score, kept_share = mask_signals(logits, kept_pixels, scale=16.0)  # 16 output pixels per cell
    np.testing.assert_allclose(mask_score.numpy(), [1.0, float(torch.sigmoid(torch.tensor(0.4))), 0.0], atol=1e-6)
    np.testing.assert_allclose(kept_share.numpy(), [0.5, 0.5, 1.0], atol=1e-6)  # 32 / (4 x 16), 64 / (8 x 16)


def test_doubt_and_image_uncertainty():
    assert segment_doubt(1.0, True) == 0.0
    assert segment_doubt(0.0, True) == 0.5  # two classes tied: half confident
    assert segment_doubt(1.0, True, 0.5, 0.5) == pytest.approx(0.75)
    assert segment_doubt(1.0, False) == 0.5
    assert segment_doubt(0.6, False, 1.0, 1.0) == pytest.approx(0.5 * (1 + 0.2))
    assert segment_doubt(0.6, False, use_agreement=False) == pytest.approx(0.2)  # CLIP's branch had no say
    assert image_uncertainty([], 0.0) == 1.0  # nothing found: look at it
    assert image_uncertainty([0.0, 0.0], 0.0) == 0.0
    assert image_uncertainty([0.5, 0.3], 0.2) == pytest.approx(0.75 * 0.4 + 0.25 * 0.2)
    # more doubt ranks higher
    assert image_uncertainty([segment_doubt(0.9, True, 0.6, 0.5)], 0.1) > \
        image_uncertainty([segment_doubt(0.9, True, 0.95, 1.0)], 0.1)
    assert unlabeled_share([10, 20], 10, 10) == pytest.approx(0.7)
    assert unlabeled_share([], 4, 5) == 1.0
    assert unlabeled_share([20], 4, 5) == 0.0


def test_model_stage_columns_are_the_models_own(tiny_preset, tiny_model):
    """The label stage's margins and agreement are query_signals of the model's ensemble for each segment's query;
    unlabeled_share is the share of zeros in the segment map."""
    from fcclip import Predictor
    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines.stages import FCCLIPSegmenter, ModelSpec, encode_rows, label_images

    vocab = load_vocabulary("person; car; dog, puppy; grass, lawn [stuff]; sky [stuff]")
    spec = ModelSpec(model=tiny_preset, weights="random", vocabulary=vocab.to_dict(), device="cpu")
    segmenter = FCCLIPSegmenter(spec)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8), rng.integers(0, 255, (72, 56, 3), dtype=np.uint8)]
    meta = {"height": [64, 72], "width": [80, 56], "error": ["", ""]}
    labeled = label_images(segmenter, meta, images, batch_size=2)  # two padded sizes: one call each
    table = encode_rows(["a.jpg", "b.jpg"], [0, 1], meta, labeled, {"vocabulary": "v", "run_id": "r", "model": "m"})
    rows = table.to_pylist()
    predictor = Predictor(tiny_model, vocab, short_edge=None, tasks=("panoptic",))
    total = 0
    for i, r in enumerate(rows):
        out, sizes, padded = predictor.infer([images[i]])
        pred = predictor.postprocess(out.class_logits[0], out.mask_logits[0], sizes[0], padded, images[i].shape[:2])
        queries = [s["query_index"] for s in pred.panoptic.segments]
        assert [s["id"] for s in r["segments"]] == [s["id"] for s in pred.panoptic.segments]
        margin, agree = query_signals(out.ensemble.probs[0], out.ensemble.in_vocab_probs[0],
                                      out.ensemble.out_vocab_probs[0])
        np.testing.assert_allclose(r["margin"], margin[queries].numpy(), atol=1e-4)
        assert r["branches_agree"] == agree[queries].tolist()
        assert r["unlabeled_share"] == pytest.approx(float((pred.panoptic.segment_map == 0).mean()), abs=1e-6)
        # mask signals from the query's own stride-4 mask, computed here by hand
        h4, w4 = -(-images[i].shape[0] // 4), -(-images[i].shape[1] // 4)
        for k, (q, s) in enumerate(zip(queries, pred.panoptic.segments)):
            prob = torch.sigmoid(out.mask_logits[0, q, :h4, :w4]).numpy()
            own = prob > 0.5
            assert r["mask_score"][k] == pytest.approx(prob[own].mean() if own.any() else 0.0, abs=1e-5)
            scale = images[i].shape[0] * images[i].shape[1] / (h4 * w4)
            expected = min(1.0, s["area"] / (own.sum() * scale)) if own.any() else 1.0
            assert r["kept_share"][k] == pytest.approx(expected, abs=1e-5)
        doubts = [segment_doubt(m, a, ms, ks) for m, a, ms, ks in  # alpha, beta > 0 here: agreement counts
                  zip(r["margin"], r["branches_agree"], r["mask_score"], r["kept_share"])]
        assert r["uncertainty"] == pytest.approx(image_uncertainty(doubts, r["unlabeled_share"]), abs=1e-5)
        total += len(queries)
    assert total > 0


def test_without_clip_weight_disagreement_does_not_count():
    """fcclip-tiny's own preset gives CLIP's branch no weight (alpha = beta = 0): its doubts ignore agreement."""

    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines.stages import FCCLIPSegmenter, ModelSpec

    vocab = load_vocabulary("person; car; grass [stuff]; sky [stuff]")
    segmenter = FCCLIPSegmenter(ModelSpec(model="fcclip-tiny", weights="random", vocabulary=vocab.to_dict(),
                                          device="cpu"))
    assert not segmenter.use_agreement
    rng = np.random.default_rng(1)
    ((_, segments),) = segmenter([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)], [(64, 64)])
    assert segments
    for s in segments:
        assert s["doubt"] == pytest.approx(1 - s["mask_score"] * s["kept_share"] * (1 + s["margin"]) / 2, abs=1e-6)


def test_stage_without_signals_and_error_rows_give_nulls():
    from fcclip_pipelines.stages import encode_rows

    meta = {"height": [4, 0], "width": [4, 0], "error": ["", "decode failed"]}
    labeled = {"maps": [np.ones((4, 4), np.uint8), None],
                "segments": [[{"id": 1, "label": "cat", "category_id": 1, "is_thing": True, "score": 0.9}], []],
                "error": ["", "decode failed"], "model": "stand-in"}
    rows = encode_rows(["a", "b"], [0, 1], meta, labeled, {"vocabulary": "v", "run_id": "r", "model": "m"}).to_pylist()
    assert rows[0]["margin"] == [None] and rows[0]["branches_agree"] == [None]
    assert rows[0]["unlabeled_share"] == 0.0 and rows[0]["uncertainty"] is None
    assert rows[1]["status"] == "error" and rows[1]["unlabeled_share"] is None and rows[1]["margin"] == []
