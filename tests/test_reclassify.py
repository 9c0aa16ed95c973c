"""Re-classification of stored per-query embeddings (fcclip.reclassify) against the model's own ensemble."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from fcclip import Predictor
from fcclip.postprocess import panoptic_inference
from fcclip.reclassify import EmbeddingSpace, reclassify

VOCAB_A = "cat; dog, puppy; grass [stuff]; sky [stuff]"
VOCAB_B = "person; car; tree, trees [stuff]; road [stuff]; kangaroo; lava [stuff]"  # seen and unseen classes
# Scores from float16 embeddings: a unit vector rounded to float16 moves by at most 2^-11 of its norm, so a cosine by
# at most ~5e-4 and a logit (scale 100) by ~0.05; in practice the scores agree to ~2e-3 relative.
FLOAT16_RTOL = 1e-2


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    img = np.zeros((96, 128, 3), np.uint8)
    img[:48] = (40, 120, 220)
    img[48:] = (60, 160, 40)
    img[30:80, 40:90] = (200, 60, 50)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def _scores(class_logits: torch.Tensor):
    """What post-processing makes of each query: (top class, its probability), void included."""
    scores, classes = torch.softmax(class_logits.float(), -1).max(-1)
    return classes.numpy(), scores.numpy()


def test_embeddings_reproduce_the_models_ensemble(tiny_model, image):
    """From the inference's own embeddings, reclassify gives the model's class log-probabilities, and for every
    panoptic segment its class and score; from the float16 copies that a labeling run stores, the same classes and
    the scores within float16 rounding."""
    predictor = Predictor(tiny_model, VOCAB_A, short_edge=None, tasks=("panoptic",))
    out, sizes, padded = predictor.infer([image])
    space = EmbeddingSpace.from_model(tiny_model)
    emb_in, emb_out, valid = out.in_vocab_embeddings[0], out.out_vocab_embeddings[0], out.valid[0]
    assert torch.allclose(emb_in.norm(dim=-1), torch.ones(emb_in.shape[0]), atol=1e-5)
    assert torch.allclose(emb_out.norm(dim=-1), torch.ones(emb_out.shape[0]), atol=1e-5)
    assert emb_in.shape[-1] == space.dim == tiny_model.void_embedding.weight.shape[-1]

    exact = reclassify(emb_in, emb_out, valid, predictor.text, space)
    torch.testing.assert_close(exact.classification.ensemble.log_probs, out.class_logits[0], atol=2e-5, rtol=0)
    classes, scores = _scores(out.class_logits[0])
    assert (exact.classes == classes).all()
    np.testing.assert_allclose(exact.scores, scores, atol=2e-6)

    half = reclassify(emb_in.half().numpy(), emb_out.half().numpy(), valid.numpy(), predictor.text, space)
    assert (half.classes == classes).all()
    np.testing.assert_allclose(half.scores, scores, rtol=FLOAT16_RTOL, atol=1e-4)

    pred = predictor.postprocess(out.class_logits[0], out.mask_logits[0], sizes[0], padded, image.shape[:2])
    assert pred.panoptic.segments
    for s in pred.panoptic.segments:
        q = s["query_index"]
        assert half.kept[q] and half.classes[q] == s["class_index"]
        assert half.scores[q] == pytest.approx(s["score"], rel=FLOAT16_RTOL)


def test_another_vocabulary_gives_what_the_predictor_gives(tiny_model, image):
    """Embeddings stored under vocabulary A, re-classified under B, give every query the class and score that the
    predictor with B gives it (the embeddings themselves do not depend on the vocabulary)."""
    a = Predictor(tiny_model, VOCAB_A, short_edge=None, tasks=("panoptic",))
    b = Predictor(tiny_model, VOCAB_B, short_edge=None, tasks=("panoptic",))
    out_a, _, _ = a.infer([image])
    out_b, sizes, padded = b.infer([image])
    torch.testing.assert_close(out_a.in_vocab_embeddings, out_b.in_vocab_embeddings)
    torch.testing.assert_close(out_a.out_vocab_embeddings, out_b.out_vocab_embeddings)
    assert b.text.seen.tolist() == [True, True, True, True, False, False]

    space = EmbeddingSpace.from_model(tiny_model)
    stored = [t[0].half().numpy() for t in (out_a.in_vocab_embeddings, out_a.out_vocab_embeddings)]
    got = reclassify(*stored, out_a.valid[0].numpy(), b.text, space)
    classes, scores = _scores(out_b.class_logits[0])
    assert (got.classes == classes).all()
    np.testing.assert_allclose(got.scores, scores, rtol=FLOAT16_RTOL, atol=1e-4)
    assert (got.kept == ((classes != 6) & (scores > space.object_mask_threshold))).all()
    pred = b.postprocess(out_b.class_logits[0], out_b.mask_logits[0], sizes[0], padded, image.shape[:2])
    for s in pred.panoptic.segments:
        assert got.classes[s["query_index"]] == s["class_index"]


def test_valid_gates_the_clip_branch(tiny_model, image):
    """With ensemble_on_valid_mask (ResNet CLIPs), a query marked not valid ignores its CLIP embedding."""
    predictor = Predictor(tiny_model, VOCAB_A, short_edge=None, tasks=("panoptic",))
    out, _, _ = predictor.infer([image])
    space = dataclasses.replace(EmbeddingSpace.from_model(tiny_model), ensemble_on_valid_mask=True)
    emb_in, emb_out = out.in_vocab_embeddings[0], out.out_vocab_embeddings[0]
    other = torch.roll(emb_out, 1, dims=0)
    valid = torch.zeros(emb_in.shape[0], dtype=torch.bool)
    valid[::2] = True
    first = reclassify(emb_in, emb_out, valid, predictor.text, space).classification.ensemble.probs
    second = reclassify(emb_in, other, valid, predictor.text, space).classification.ensemble.probs
    assert torch.equal(first[~valid], second[~valid])
    assert not torch.allclose(first[valid], second[valid])


def test_embedding_space_round_trips_through_json(tiny_model):
    space = EmbeddingSpace.from_model(tiny_model)
    again = EmbeddingSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again == space
    assert space.model == "fcclip-tiny@random" and "dog" in space.seen_names
    void = torch.nn.functional.normalize(tiny_model.void_embedding.weight, dim=-1)[0]
    assert space.void_embedding == tuple(void.tolist())
    with pytest.raises(ValueError, match="unknown"):
        EmbeddingSpace.from_dict({**space.to_dict(), "extra": 1})


def test_panoptic_query_index_is_the_kept_query_with_the_segment_score():
    """A thing segment's query is its only one; a stuff segment merged from several queries keeps the one with the
    largest score (the segment's score), not the first."""
    h, w = 4, 6
    high, low = 10.0, -10.0
    masks = torch.full((3, h, w), low)
    masks[0, :, :2] = high  # q0: stuff class 1, p 0.6
    masks[1, :, 2:4] = high  # q1: thing class 0
    masks[2, :, 4:] = high  # q2: stuff class 1, p 0.9
    probs = torch.tensor([[0.2, 0.6, 0.2], [0.8, 0.1, 0.1], [0.05, 0.9, 0.05]])
    out = panoptic_inference(torch.log(probs), masks, [True, False])
    assert [(s["id"], s["class_index"]) for s in out.segments] == [(1, 1), (2, 0)]
    assert out.segments[0]["score"] == pytest.approx(0.9)
    assert out.query_index == [2, 1]
