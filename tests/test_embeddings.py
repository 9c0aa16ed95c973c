"""`fcclip label --embeddings`, `fcclip relabel` and `fcclip search` end to end on a local Ray, checked against the
predictor on the same images."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fcclip import Predictor
from fcclip.reclassify import EmbeddingSpace
from fcclip.uncertainty import image_uncertainty, query_signals, segment_doubt
from fcclip.vocabulary import load_vocabulary
from fcclip_pipelines.cli import main
from fcclip_pipelines.output import part_schema

pytestmark = pytest.mark.ray

VOCAB = "person; car; dog, puppy; grass, lawn [stuff]; sky [stuff]"
NEW = "cat; tree, trees [stuff]; road [stuff]; kangaroo; lava [stuff]; wall [stuff]"
SCORE_RTOL = 1e-2  # float16 embeddings at logit scale 100 (see tests/test_reclassify.py)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _label(source, dest, model, *more):
    return main(["label", str(source), "--out", str(dest), "--vocab", VOCAB, "--model", model, "--weights", "random",
                 "--short-edge", "0", "--batch-size", "1", "--shard-size", "2", "--no-progress", *more])


@pytest.fixture(scope="module")
def lake(tmp_path_factory, ray_local, tiny_preset):
    """Five synthetic images and an unreadable file, labeled with embeddings at their own size by `tiny_model`
    (fcclip-tiny with the paper's ensemble weights, so that CLIP's branch counts)."""
    from fcclip.datasets.synthetic import write_images

    root = tmp_path_factory.mktemp("lake")
    write_images(root / "in", count=5, size=(96, 128), seed=7)
    (root / "in" / "broken.jpg").write_bytes(b"not a picture")
    assert _label(root / "in", root / "labels", tiny_preset, "--embeddings") == 0
    return root


def _rows(dest):
    return {r["uri"]: r for r in pq.read_table(dest).to_pylist()}


def test_label_stores_each_segments_query_embeddings(lake, tiny_model):
    dest = lake / "labels"
    table = pq.read_table(dest)
    assert table.schema.remove_metadata() == part_schema(64).remove_metadata()
    meta = pq.read_metadata(dest / "part-000000.parquet").metadata
    space = EmbeddingSpace.from_dict(json.loads(meta[b"fcclip.embeddings"]))
    assert space == EmbeddingSpace.from_model(tiny_model)
    assert json.loads((dest / "_fcclip" / "run.json").read_text())["embeddings"] == space.to_dict()

    predictor = Predictor(tiny_model, VOCAB, short_edge=None, tasks=("panoptic",))
    rows = _rows(dest)
    assert sum(len(r["segments"]) for r in rows.values()) >= 5
    for uri, r in rows.items():
        n = len(r["segments"])
        assert [len(r[name]) for name in ("query_index", "embedding_in", "embedding_out", "embedding_valid")] == [n] * 4
        if r["status"] == "error":
            assert n == 0
            continue
        # the stored vectors are the model's own, for the query each segment came from
        out, sizes, padded = predictor.infer([predictor.preprocess(uri)])
        size = (r["height"], r["width"])
        pred = predictor.postprocess(out.class_logits[0], out.mask_logits[0], sizes[0], padded, size)
        assert [(s["id"], s["label"]) for s in r["segments"]] == [(s["id"], s["label"]) for s in pred.panoptic.segments]
        assert r["query_index"] == [s["query_index"] for s in pred.panoptic.segments]
        for k, q in enumerate(r["query_index"]):
            for name, ours in (("embedding_in", out.in_vocab_embeddings), ("embedding_out", out.out_vocab_embeddings)):
                stored = np.array(r[name][k], np.float32)
                assert np.linalg.norm(stored) == pytest.approx(1.0, abs=2e-3)
                np.testing.assert_allclose(stored, ours[0, q].numpy(), atol=2e-3)
        assert all(r["embedding_valid"])
        # the uncertainty columns are the model's own ensemble's, for the same queries (fcclip.uncertainty)
        margin, agree = query_signals(out.ensemble.probs[0], out.ensemble.in_vocab_probs[0],
                                      out.ensemble.out_vocab_probs[0])
        np.testing.assert_allclose(r["margin"], margin[r["query_index"]].numpy(), atol=1e-4)
        assert r["branches_agree"] == agree[r["query_index"]].tolist()
        assert r["unlabeled_share"] == pytest.approx(1 - sum(s["area"] for s in r["segments"]) / (size[0] * size[1]),
                                                     abs=1e-4)
        doubts = [segment_doubt(*v) for v in  # alpha, beta > 0 here
                  zip(r["margin"], r["branches_agree"], r["mask_score"], r["kept_share"])]
        assert r["uncertainty"] == pytest.approx(image_uncertainty(doubts, r["unlabeled_share"]), abs=1e-4)


def test_without_embeddings_the_schema_is_unchanged(lake, tmp_path, capsys):
    assert _label(lake / "in", tmp_path / "plain", "fcclip-tiny") == 0
    assert pq.read_table(tmp_path / "plain").schema.remove_metadata() == part_schema()
    assert b"fcclip.embeddings" not in pq.read_metadata(tmp_path / "plain" / "part-000000.parquet").metadata
    # and relabel says what it needs
    capsys.readouterr()
    assert main(["relabel", str(tmp_path / "plain"), "--vocab", NEW, "--out", str(tmp_path / "r")]) == 2
    assert "relabel needs a run labeled with --embeddings" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # DEST2 inside DEST: readers of DEST would take its part files for DEST's rows
    assert main(["relabel", str(tmp_path / "plain"), "--vocab", NEW, "--out", str(tmp_path / "plain" / "r")]) == 2
    assert f"inside the output {tmp_path / 'plain'}" in capsys.readouterr().err
    assert not (tmp_path / "plain" / "r").exists()


def test_relabel_with_the_same_vocabulary_reproduces_the_labels(lake, capsys):
    dest, again = lake / "labels", lake / "same"
    assert main(["relabel", str(dest), "--vocab", VOCAB, "--out", str(again)]) == 0
    assert "0 changed class, 0 merged, 0 dropped" in capsys.readouterr().out
    before, after = _rows(dest), _rows(again)
    assert sorted(before) == sorted(after)
    for uri, r in before.items():
        a = after[uri]
        assert (a["status"], a["error"], a["width"], a["height"]) == (r["status"], r["error"], r["width"], r["height"])
        assert [(s["id"], s["label"], s["category_id"], s["is_thing"], s["rle"], s["area"], s["bbox"])
                for s in a["segments"]] == [(s["id"], s["label"], s["category_id"], s["is_thing"], s["rle"],
                                             s["area"], s["bbox"]) for s in r["segments"]]
        for s, t in zip(a["segments"], r["segments"]):
            assert s["score"] == pytest.approx(t["score"], rel=SCORE_RTOL)
        for name in ("query_index", "embedding_in", "embedding_out", "embedding_valid"):
            assert a[name] == r[name]
    run = json.loads((again / "_fcclip" / "run.json").read_text())
    source_run = json.loads((dest / "_fcclip" / "run.json").read_text())["run_id"]
    assert run["source_run"]["run_id"] == source_run and run["settings"]["source_run"] == source_run
    meta = pq.read_metadata(again / "part-000000.parquet").metadata
    assert json.loads(meta[b"fcclip.source_run"])["run_id"] == source_run
    assert json.loads(meta[b"fcclip.run_id"]) == run["run_id"] != source_run


def test_relabel_with_another_vocabulary_gives_the_models_classes(lake, tiny_model, capsys):
    """Each segment of DEST2 has the class and score that the predictor's ensemble under NEW gives its query on the
    same image; segments whose query NEW makes void are dropped, stuff segments of one class merged."""
    dest, other = lake / "labels", lake / "other"
    assert main(["relabel", str(dest), "--vocab", NEW, "--out", str(other)]) == 0
    capsys.readouterr()
    vocabulary = load_vocabulary(NEW)
    predictor = Predictor(tiny_model, vocabulary, short_edge=None, tasks=("panoptic",))
    before, after = _rows(dest), _rows(other)
    changed = 0
    for uri, r in before.items():
        if r["status"] == "error":
            assert after[uri]["status"] == "error" and after[uri]["segments"] == []
            continue
        out, _, _ = predictor.infer([predictor.preprocess(uri)])
        scores, classes = torch.softmax(out.class_logits[0], -1).max(-1)
        expected, stuff = [], {}
        for s, q in zip(r["segments"], r["query_index"]):
            c, score = int(classes[q]), float(scores[q])
            if c == len(vocabulary) or score <= 0.0:
                continue
            if not vocabulary.thing_mask[c] and c in stuff:
                if score > stuff[c]["score"]:
                    stuff[c].update(score=score, query=q)
                continue
            entry = {"id": s["id"], "label": vocabulary.labels[c], "score": score, "query": q}
            expected.append(entry)
            if not vocabulary.thing_mask[c]:
                stuff[c] = entry
        got = after[uri]["segments"]
        assert [(s["id"], s["label"]) for s in got] == [(e["id"], e["label"]) for e in expected]
        for s, e in zip(got, expected):
            assert s["score"] == pytest.approx(e["score"], rel=SCORE_RTOL)
        # uncertainty recomputed under NEW from the kept query of each segment (float16 embeddings: loose)
        ens = out.ensemble
        margin, agree = query_signals(ens.probs[0], ens.in_vocab_probs[0], ens.out_vocab_probs[0])
        queries = [e["query"] for e in expected]
        np.testing.assert_allclose(after[uri]["margin"], margin[queries].numpy(), atol=2e-2)
        for q, a in zip(queries, after[uri]["branches_agree"]):
            gaps = [p[0, q].topk(2).values for p in (ens.in_vocab_probs, ens.out_vocab_probs)]
            if all(float(g[0] - g[1]) > 1e-2 for g in gaps):  # not a near tie that float16 could flip
                assert a == bool(agree[q])
        assert set(after[uri]["mask_score"]) <= set(r["mask_score"])  # the masks' signals are kept
        share = 1 - sum(s["area"] for s in got) / (after[uri]["height"] * after[uri]["width"])
        assert after[uri]["unlabeled_share"] == pytest.approx(share, abs=1e-4)
        changed += len(got)
    assert changed > 0
    assert json.loads((other / "_fcclip" / "run.json").read_text())["vocabulary"] == vocabulary.to_dict()


def test_relabel_is_resumable_and_refuses_other_settings(lake, capsys):
    dest, out = lake / "labels", lake / "resumed"
    args = ["relabel", str(dest), "--vocab", NEW, "--out", str(out)]
    assert main(args) == 0
    first = {p.name: pq.read_table(p).to_pylist() for p in out.glob("*.parquet")}
    assert sorted(first) == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    # killed after writing a part file, before naming it in DEST2's table: the last version undone, its file removed,
    # and run.json without the mark of a run that saw all its shards committed
    log = sorted((out / "_delta_log").glob("*.json"))
    (added,) = [json.loads(line)["add"]["path"] for line in log[-1].read_text().splitlines() if '"add"' in line]
    log[-1].unlink()
    (out / added).unlink()
    run_json = out / "_fcclip" / "run.json"
    run = json.loads(run_json.read_text())
    assert run["increments"][-1].pop("complete") is True
    run_json.write_text(json.dumps(run))
    capsys.readouterr()
    assert main(args) == 0
    assert "2 shard(s) were already committed" in capsys.readouterr().out
    assert {p.name: pq.read_table(p).to_pylist() for p in out.glob("*.parquet")} == first
    assert main(["relabel", str(dest), "--vocab", "cat; dog", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_relabel_into_a_destination_that_refuses_a_write_is_one_line(lake, capsys):
    """A part file of DEST2 cannot be written (a folder stands where it goes): one line naming what the task's write
    raised and where, exit status 1; once the path is free the same command finishes the rest."""
    import shutil

    dest, out = lake / "labels", lake / "refused"
    (out / "part-000001.parquet" / "x").mkdir(parents=True)
    args = ["relabel", str(dest), "--vocab", NEW, "--out", str(out), "--overwrite"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fcclip relabel: error: storage: IsADirectoryError: "), err[-1]
    assert "part-000001.parquet" in err[-1] and "ray::" not in err[-1], err[-1]
    shutil.rmtree(out / "part-000001.parquet")
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-00000{i}.parquet" for i in range(3)]


def test_search_ranks_a_segments_own_embedding_first(lake):
    """A query built from a segment's stored CLIP embedding ranks that segment first; segments whose stored vector
    is the very same (the tiny model pools some masks over the same few cells of its coarse CLIP grid) tie with
    it, in file and row order."""
    from fcclip_pipelines.search import search_segments

    dest = lake / "labels"
    segments = [(r["uri"], s["id"], tuple(v)) for r in _rows(dest).values()
                for s, v in zip(r["segments"], r["embedding_out"])]
    unique_first = 0
    for uri, segment_id, vector in segments:
        same = {(u, i) for u, i, v in segments if v == vector}
        hits = search_segments(str(dest), np.array(vector, np.float32), top=len(same))
        assert {(h.uri, h.segment_id) for h in hits} == same
        assert all(h.similarity == pytest.approx(1.0, abs=1e-3) for h in hits)
        if len(same) == 1:
            unique_first += 1
        # the next best is less similar
        more = search_segments(str(dest), np.array(vector, np.float32), top=len(same) + 1)
        assert more[: len(same)] == hits and (len(more) == len(same) or more[-1].similarity < hits[-1].similarity)
    assert unique_first >= 3


def test_search_command_gallery_and_duckdb_sql(lake, capsys):
    import duckdb

    dest = lake / "labels"
    page = lake / "hits.html"
    assert main(["search", str(dest), "a dog on the grass", "--top", "2", "--out", str(page)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["similarity", "uri", "segment", "label", "score"]
    top = lines[1].split("\t")
    html = page.read_text()
    assert html.count("<figure") == 2 and 'data-rank="1"' in html and "data:image/jpeg;base64," in html

    # the README's SQL, with the vector from fcclip embed-text
    assert main(["embed-text", "a dog on the grass", "--model", "fcclip-tiny", "--weights", "random"]) == 0
    vector = json.loads(capsys.readouterr().out)
    assert len(vector) == 64
    with duckdb.connect() as con:  # not the module's default connection, which other tests use
        best = con.execute(
            f"""select uri, s.id, s.label, array_cosine_similarity(e::FLOAT[64], $q::FLOAT[64]) as similarity
                from (select uri, unnest(segments) as s, unnest(embedding_out) as e
                      from read_parquet('{dest}/*.parquet'))
                order by similarity desc limit 1""", {"q": vector}).fetchone()
    assert (best[0], str(best[1])) == (top[1], top[2])
    assert best[3] == pytest.approx(float(top[0]), abs=1e-3)


def test_show_export_and_training_reader_ignore_the_embeddings(lake, tmp_path):
    import pyarrow.parquet as pq

    from fcclip_pipelines.train_data import DecodeSamples, open_training_data

    for dest in (lake / "labels", lake / "same"):
        assert main(["show", str(dest), "--out", str(tmp_path / "r.html"), "--sample", "2"]) == 0
        assert main(["export", str(dest), "--format", "coco-panoptic", "--out", str(tmp_path / dest.name)]) == 0
        assert json.loads((tmp_path / dest.name / "panoptic.json").read_text())["annotations"]
        data = open_training_data(str(dest), split="train", synonyms=None)
        decode = DecodeSamples(data.class_index, 0.0, {"image_size": 64, "min_scale": 1.0, "max_scale": 1.0}, 0)
        table = pq.read_table(dest / "part-000000.parquet")
        samples = decode(table.filter(table.column("status").to_numpy(zero_copy_only=False) == "ok"))
        assert len(samples["image"]) >= 1
