"""`fcclip relabel`'s per-row rules on hand-built rows (no model, no Ray): classes from the stored embeddings,
void and low-score segments dropped, stuff segments of one class merged, error rows passed through."""
import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_util

from fcclip.reclassify import EmbeddingSpace, reclassify
from fcclip.vocabulary import load_vocabulary
from fcclip_pipelines.relabel import NewVocabulary, new_stats, relabel_batch
from fcclip_pipelines.output import SCHEMA, output_schema
from fcclip_pipelines.stages import _embedding_columns

D = 8
H, W = 4, 6


def _unit(*weights):
    v = np.zeros(D, np.float32)
    v[: len(weights)] = weights
    return v / np.linalg.norm(v)


def _space(min_threshold=0.0):
    return EmbeddingSpace(
        model="stand-in@none", dim=D, void_embedding=tuple(np.eye(D, dtype=np.float32)[7].tolist()),
        in_vocab_logit_scale=float(np.log(8.0)), out_vocab_logit_scale=float(np.log(8.0)), alpha=0.4, beta=0.8,
        ensemble_on_valid_mask=False, train_vocabulary="stand-in", seen_names=("wall",), text_tower="none",
        object_mask_threshold=min_threshold,
    )


def _segment(id_, label, is_thing, score, columns, emb):
    mask = np.zeros((H, W), np.uint8)
    mask[:, columns] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    return {
        "id": id_, "label": label, "category_id": id_, "is_thing": is_thing, "score": score,
        "area": int(mask.sum()), "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "rle": {"size": [H, W], "counts": rle["counts"].decode()},
        "query_index": 10 + id_, "embedding_in": emb.astype(np.float16), "embedding_out": emb.astype(np.float16),
        "embedding_valid": True,
    }


@pytest.fixture
def batch():
    return _batch()


def _batch():
    wall_ish = _unit(1, 0.3)  # closer to wall than to anything else, less so than e0
    segments = [
        _segment(1, "a", True, 0.5, slice(0, 2), wall_ish),
        _segment(2, "b", True, 0.5, slice(2, 4), _unit(0, 0, 1)),  # chair
        _segment(3, "c", False, 0.5, slice(4, 5), _unit(1)),  # wall, a better score than segment 1
        _segment(4, "d", False, 0.5, slice(5, 6), np.eye(D, dtype=np.float32)[7]),  # the void direction
    ]
    keys = ("id", "label", "category_id", "is_thing", "score", "area", "bbox", "rle")
    rows = [
        {"uri": "a.jpg", "image_id": "1", "width": W, "height": H, "status": "ok", "error": None,
         "segments": [{k: s[k] for k in keys} for s in segments], "model": "m", "vocabulary": "old", "run_id": "r0"},
        {"uri": "b.jpg", "image_id": "2", "width": None, "height": None, "status": "error", "error": "bad",
         "segments": [], "model": "m", "vocabulary": "old", "run_id": "r0"},
    ]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    schema = output_schema(D)
    offsets = pa.array([0, 4, 4], pa.int32())
    for name, column in _embedding_columns(segments, offsets, D, schema).items():
        table = table.append_column(schema.field(name), column)
    return table.to_batches()[0], segments


def _relabel(source, min_score):
    """(the relabeled table, its counts, the new vocabulary) under "wall [stuff]; floor [stuff]; chair", whose text
    rows are the first three axes."""
    vocabulary = load_vocabulary("wall [stuff]; floor [stuff]; chair")
    new = NewVocabulary(vocabulary.to_dict(), np.eye(D, dtype=np.float32)[:3], np.arange(3), _space().to_dict())
    stats = new_stats()
    return relabel_batch(source, new, min_score, {"vocabulary": "new@x", "run_id": "r1"}, stats), stats, new


def test_relabel_tasks_do_not_load_the_model_stack():
    """A relabel task's worker imports this module and computes with stored embeddings and the new text rows: it
    loads torch, but not open_clip, timm or torchvision (about 2 s and hundreds of MiB per worker process)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nimport tests.test_relabel as t\ntable, stats, _ = t._relabel(t._batch()[0], 0.0)\n"
            "assert table.num_rows == 2 and stats['segments_in'] == 4, (table.num_rows, stats)\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'timm', 'torchvision'))\n"
            "assert not loaded, loaded[:10]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_relabel_rules(batch):
    source, segments = batch
    space = _space()
    out, stats, new = _relabel(source, 0.0)
    assert out.schema == output_schema(D)
    ok, error = out.to_pylist()

    expected = reclassify(np.stack([s["embedding_in"] for s in segments]), np.stack([s["embedding_out"] for s in
                          segments]), None, new.text(), space)
    assert expected.classes.tolist()[:3] == [0, 2, 0] and not expected.kept[3]  # wall, chair, wall, void
    assert expected.scores[2] > expected.scores[0]

    wall, chair = ok["segments"]
    # the two wall segments are one: the union of the masks, the better score and its query's embeddings, id 1
    assert (wall["id"], wall["label"], wall["category_id"], wall["is_thing"]) == (1, "wall", 1, False)
    assert wall["score"] == pytest.approx(float(expected.scores[2]))
    mask = mask_util.decode({"size": wall["rle"]["size"], "counts": wall["rle"]["counts"].encode()})
    assert mask[:, [0, 1, 4]].all() and not mask[:, [2, 3, 5]].any() and wall["area"] == 3 * H
    assert wall["bbox"] == [0.0, 0.0, 5.0, float(H)]
    assert (chair["id"], chair["label"], chair["is_thing"], chair["rle"]) == (2, "chair", True, segments[1]["rle"])
    assert chair["score"] == pytest.approx(float(expected.scores[1]))
    assert ok["query_index"] == [13, 12]
    np.testing.assert_array_equal(np.array(ok["embedding_out"][0], np.float16), segments[2]["embedding_out"])
    assert ok["embedding_valid"] == [True, True]
    assert (ok["vocabulary"], ok["run_id"], ok["model"], ok["uri"]) == ("new@x", "r1", "m", "a.jpg")
    # the error row passes through
    assert (error["status"], error["error"], error["segments"], error["embedding_in"]) == ("error", "bad", [], [])
    assert stats == {"ok": 1, "failed": 1, "segments_in": 4, "segments": 2, "dropped": 1, "merged": 1, "changed": 3}


def test_min_score_drops_segments(batch):
    out, stats, _ = _relabel(batch[0], 0.9999)
    kept = out.to_pylist()[0]["segments"]
    assert all(s["score"] >= 0.9999 for s in kept) and stats["dropped"] >= 2
    assert len(out.to_pylist()[0]["query_index"]) == len(kept)
