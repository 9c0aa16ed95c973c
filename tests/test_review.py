"""`fcclip review`: pick over a labeling output, and push / pull against a real Label Studio server.

The Label Studio tests start `label-studio` from its own environment (`make .venv-ls`, or FCCLIP_LABEL_STUDIO naming
the executable) on a free loopback port, with its SQLite default in a temporary folder and a user and legacy API
token made for the test, and stop it (its whole process group) at the end. Without it they fail under CI and are
skipped elsewhere.
"""
import datetime
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcclip import brush
from fcclip.masks import decode_rle, panoptic_columns
from fcclip.vocabulary import load_vocabulary
from fcclip_pipelines import review
from fcclip_pipelines.cli import main
from fcclip_pipelines.output import Destination, part_schema, rows_to_table, stat_version, write_part
from fcclip_pipelines.stages import image_id
from tests.servers import free_port, wait_until_served

VOCAB = load_vocabulary("cat; dog, puppy; car; grass, lawn [stuff]; sky [stuff]")
ROOT = Path(__file__).resolve().parents[1]


def _segment_map(rng, h, w):
    """A panoptic map: sky on top, grass below, two or three things (ids 3..)."""
    seg = np.zeros((h, w), np.int32)
    seg[: h // 3] = 1
    seg[2 * h // 3:] = 2
    things = []
    for k in range(int(rng.integers(2, 4))):
        y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        seg[y:y + int(rng.integers(4, h // 2)), x:x + int(rng.integers(4, w // 2))] = 3 + k
        things.append(3 + k)
    seg[rng.random((h, w)) < 0.02] = 0  # a few unlabeled pixels, scattered
    return seg


def make_output(dest: Path, uris: list[str], sizes, uncertainties, *, files: int = 1, seed: int = 0,
                errors: tuple[int, ...] = (), etags: list[str] | None = None):
    """A labeling output made by hand: per image a segment map encoded by the label stage's own encoder; with
    ``etags``, the source columns a committed shard has (each object's ETag, its size and time fixed)."""
    rng = np.random.default_rng(seed)
    cats = VOCAB.categories
    rows = []
    for i, (uri, (h, w), u) in enumerate(zip(uris, sizes, uncertainties)):
        if i in errors:
            rows.append({"uri": uri, "image_id": image_id(uri), "status": "error", "error": "decode failed",
                         "segments": []})
            continue
        seg = _segment_map(rng, h, w)
        ids = [int(v) for v in np.unique(seg) if v]
        classes = {1: 4, 2: 3}
        segs = [{"id": s, "label": cats[classes.get(s, s % 3)].names[0], "category_id": cats[classes.get(s, s % 3)].id,
                 "is_thing": s > 2, "score": 0.5} for s in ids]
        cols = panoptic_columns(seg, segs)
        for s, area, bbox, counts in zip(segs, cols["area"], cols["bbox"], cols["counts"]):
            s.update(area=area, bbox=bbox, rle={"size": [h, w], "counts": counts})
        rows.append({"uri": uri, "image_id": image_id(uri), "width": w, "height": h, "status": "ok", "error": None,
                     "segments": segs, "model": "fcclip-tiny@test", "vocabulary": "v", "run_id": "r",
                     "margin": [0.5] * len(segs), "branches_agree": [True] * len(segs),
                     "unlabeled_share": float((seg == 0).mean()), "uncertainty": u})
    if etags is not None:
        when = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
        for r, etag in zip(rows, etags):
            r.update(source_etag=etag, source_size=1000, source_mtime=when)
            if os.path.exists(r["uri"]):  # a local file's size and time, as a listing records them
                r.update({**stat_version(os.stat(r["uri"])), "source_etag": etag})
    per = -(-len(rows) // files)
    for shard in range(files):
        table = rows_to_table(rows[shard * per:(shard + 1) * per])
        if etags is not None:
            table = pa.Table.from_pylist(rows[shard * per:(shard + 1) * per], schema=part_schema())
        write_part(Destination(str(dest)), shard, table, {"vocabulary": VOCAB.to_dict(), "run_id": "r"})
    return rows


# ------------------------------------------------------------------------------------------------------ pick
@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("pick")
    n = 40
    uris = [f"s3://bucket/img_{i:03d}.jpg" for i in range(n)]
    rng = np.random.default_rng(1)
    unc = [float(v) for v in rng.random(n)]
    rows = make_output(root / "one", uris, [(12, 16)] * n, unc, files=1, errors=(3, 7))
    make_output(root / "four", uris, [(12, 16)] * n, unc, files=4, errors=(3, 7))
    return root, rows


def test_pick_by_uncertainty_streams_and_ranks(lake, monkeypatch):
    root, rows = lake
    ok = [r for r in rows if r["status"] == "ok"]
    expected = [r["image_id"] for r in sorted(ok, key=lambda r: -r["uncertainty"])[:7]]
    monkeypatch.setattr(review, "BATCH_ROWS", 3)  # many batches: the heap, not a table, holds the picks
    for layout in ("one", "four"):
        picks = review.pick(str(root / layout), 7, "uncertainty")
        got = picks.table.to_pylist()
        assert [r["image_id"] for r in got] == expected
        assert [r["rank"] for r in got] == list(range(1, 8))
        assert got[0]["why"] == f"uncertainty {got[0]['score']:.3f}"
        assert got[0]["score"] == pytest.approx(max(r["uncertainty"] for r in ok))


def test_pick_random_is_seeded_and_skips_error_rows(lake):
    root, rows = lake
    a = review.pick(str(root / "one"), 38, "random", seed=3).table.column("image_id").to_pylist()
    b = review.pick(str(root / "four"), 38, "random", seed=3).table.column("image_id").to_pylist()
    c = review.pick(str(root / "one"), 38, "random", seed=4).table.column("image_id").to_pylist()
    assert a == b != c  # a function of the rows and the seed, not of the files
    assert sorted(a) == sorted(r["image_id"] for r in rows if r["status"] == "ok")  # all 38 ok rows, no error row
    assert review.pick(str(root / "one"), 100, "random").table.num_rows == 38


def test_pick_by_class_and_the_cli(lake, tmp_path, capsys):
    root, rows = lake
    with_car = [r for r in rows if r["status"] == "ok" and any(s["label"] == "car" for s in r["segments"])]
    assert 0 < len(with_car) < 38
    out = tmp_path / "picks.parquet"
    assert main(["review", "pick", str(root / "one"), "--count", "50", "--by", "class=car", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(with_car)} image(s) picked by class=car" in printed
    picks = review.read_picks(str(out))
    assert picks.dest == str(root / "one") and picks.vocabulary == VOCAB.to_dict()
    assert [r["image_id"] for r in picks.table.to_pylist()] == \
        [r["image_id"] for r in sorted(with_car, key=lambda r: -r["uncertainty"])]
    assert "car segment" in picks.table.column("why")[0].as_py()
    # synonyms name the class too; unknown classes and rules are one-line errors
    assert review.pick(str(root / "one"), 50, "class=puppy").table.num_rows > 0
    assert main(["review", "pick", str(root / "one"), "--count", "5", "--by", "class=zebra"]) == 2
    assert "no class of that name" in capsys.readouterr().err
    assert main(["review", "pick", str(root / "one"), "--count", "5", "--by", "loudness"]) == 2
    assert "expected uncertainty, random or class=NAME" in capsys.readouterr().err
    assert main(["review", "pick", str(tmp_path), "--count", "5"]) == 2
    assert "not a labeling output" in capsys.readouterr().err


def test_pick_every_night_leaves_out_earlier_picks_and_reviewed_images(lake, tmp_path, capsys):
    """The nightly loop: `--exclude picks/ --out picks/NIGHT.parquet` sends people new images each night (the same
    command again gives the same list), and a labeling output such as REVIEWED leaves out the images it holds."""
    root, rows = lake
    order = [r["image_id"] for r in sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["uncertainty"])]
    dest, picks = str(root / "four"), tmp_path / "picks"

    def night(name, *more):
        assert main(["review", "pick", dest, "--count", "5", "--exclude", str(picks), *more,
                     "--out", str(picks / f"{name}.parquet")]) == 0
        return [r["image_id"] for r in review.read_picks(str(picks / f"{name}.parquet")).table.to_pylist()]

    assert night("n1") == order[:5]  # picks/ does not exist yet: nothing to leave out
    assert "5 image(s) picked by uncertainty" in capsys.readouterr().out
    assert night("n1") == order[:5]  # run again: its own list is not left out
    assert night("n2") == order[5:10]
    assert "(5 left out by --exclude)" in capsys.readouterr().out
    assert review.read_picks(str(picks / "n2.parquet")).exclude == (str(picks),)

    reviewed = tmp_path / "reviewed"  # a labeling output holding two of the next images
    make_output(reviewed, [rows[[r["image_id"] for r in rows].index(i)]["uri"] for i in order[10:12]], [(12, 16)] * 2,
                [0.5, 0.5])
    assert night("n3", "--exclude", str(reviewed)) == order[12:17]
    assert "(12 left out by --exclude)" in capsys.readouterr().out
    # a single list file too; a missing file and a Parquet file without image ids are one-line errors
    got = review.pick(dest, 3, exclude=[str(picks / "n1.parquet")]).table.column("image_id").to_pylist()
    assert got == order[5:8]
    assert main(["review", "pick", dest, "--count", "5", "--exclude", str(tmp_path / "nope.parquet")]) == 2
    assert "--exclude" in capsys.readouterr().err
    other = tmp_path / "other.parquet"
    pa_table = review.pa.table({"x": [1]})
    review.pq.write_table(pa_table, other)
    assert main(["review", "pick", dest, "--count", "5", "--exclude", str(other)]) == 2
    assert "has no image_id column" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- Label Studio
def _label_studio_bin():
    path = os.environ.get("FCCLIP_LABEL_STUDIO") or str(ROOT / ".venv-ls" / "bin" / "label-studio")
    if not os.access(path, os.X_OK):
        message = f"Label Studio is not installed at {path} (make .venv-ls)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A Label Studio server on loopback: (url, token, document root, user e-mail)."""
    exe = _label_studio_bin()
    base = tmp_path_factory.mktemp("label-studio")
    root = base / "files"
    root.mkdir()
    port, token, email = free_port(), secrets.token_hex(20), "reviewer@example.com"
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"), "LATEST_VERSION_CHECK": "false",
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root),
           "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}
    log = open(base / "server.log", "wb")
    proc = subprocess.Popen(
        [exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port), "--username", email,
         "--password", secrets.token_hex(8), "--user-token", token, "--enable-legacy-api-token"],
        cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_served(urllib.request.Request(f"{url}/api/projects", headers={"Authorization": f"Token {token}"}),
                          proc, 180, lambda: (base / "server.log").read_text()[-2000:], every=1)
        yield url, token, root, email
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()


def _api(url, token, method, path, **kw):
    import requests

    r = requests.request(method, url + path, headers={"Authorization": f"Token {token}"}, timeout=30, **kw)
    assert r.status_code < 400, (method, path, r.status_code, r.text[:500])
    return r.json() if r.content else None


def test_push_annotate_pull_round_trip(label_studio, tmp_path, monkeypatch, capsys):
    """Push 5 picked images; annotate 3 through the API (accepted, a mask edited, a class changed); pull: the accepted
    masks are the model's pixel for pixel, the edit and the class change are there, one skipped, one pending."""
    from fcclip.datasets.synthetic import write_images

    url, token, root, email = label_studio
    images = write_images(root / "photos", count=6, size=(37, 53), seed=5)
    labels = tmp_path / "labels"
    rows = make_output(labels, [str(p) for p in images], [(37, 53)] * 6, [0.9, 0.8, 0.1, 0.7, 0.6, 0.5], seed=2)
    picks = tmp_path / "picks.parquet"
    assert main(["review", "pick", str(labels), "--count", "5", "--out", str(picks)]) == 0
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    assert main(["review", "push", str(picks), "--label-studio", url, "--project", "review-1"]) == 2
    assert "set LABEL_STUDIO_API_KEY" in capsys.readouterr().err  # the token comes from the environment only
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    push = ["review", "push", str(picks), "--label-studio", url, "--project", "review-1", "--document-root", str(root)]
    assert main(push[:-2]) == 2  # local images and no --document-root: refused before the project is made
    assert "give --document-root" in capsys.readouterr().err
    assert "review-1" not in [p["title"] for p in _api(url, token, "GET", "/api/projects")["results"]]
    assert main(push) == 0
    assert "5 task(s) added" in capsys.readouterr().out
    assert main(push) == 0  # a rerun adds nothing
    assert "0 task(s) added to project 'review-1' (5 already there)" in capsys.readouterr().out

    project = next(p for p in _api(url, token, "GET", "/api/projects")["results"] if p["title"] == "review-1")
    tasks = _api(url, token, "GET", f"/api/tasks?project={project['id']}&fields=all&page_size=100")["tasks"]
    by_id = {r["image_id"]: r for r in rows}
    assert sorted(t["data"]["image_id"] for t in tasks) == sorted(
        r["image_id"] for r in rows if r["uncertainty"] != 0.1)
    for t in tasks:
        # the browser's URL serves the image, through Label Studio's local-file serving
        import requests

        r = requests.get(url + t["data"]["image"], headers={"Authorization": f"Token {token}"}, timeout=30)
        assert r.status_code == 200 and r.content == Path(t["data"]["uri"]).read_bytes()
        # the prediction is the model's segments, mask for mask
        row = by_id[t["data"]["image_id"]]
        (prediction,) = t["predictions"]
        assert len(prediction["result"]) == len(row["segments"])
        for region, s in zip(prediction["result"], row["segments"]):
            assert region["value"]["brushlabels"] == [s["label"]]
            np.testing.assert_array_equal(brush.decode(region["value"]["rle"], 37, 53), decode_rle(s["rle"]))

    # a reviewer: accepts the first as predicted, edits a mask of the second, changes a class in the third
    accepted, edited, changed = sorted(tasks, key=lambda t: t["id"])[:3]
    _api(url, token, "POST", f"/api/tasks/{accepted['id']}/annotations",
         json={"result": accepted["predictions"][0]["result"], "lead_time": 1.0})
    result = [dict(r) for r in edited["predictions"][0]["result"]]
    thing = next(k for k, r in enumerate(result) if r["value"]["brushlabels"][0] in ("cat", "dog", "car"))
    mask = brush.decode(result[thing]["value"]["rle"], 37, 53)
    new_mask = mask.copy()
    ys, xs = np.nonzero(mask)
    new_mask[ys.min():ys.min() + 2] = False  # two rows shaved off
    assert new_mask.sum() < mask.sum()
    result[thing] = {**result[thing], "value": {**result[thing]["value"], "rle": brush.encode(new_mask)}}
    _api(url, token, "POST", f"/api/tasks/{edited['id']}/annotations", json={"result": result, "lead_time": 2.0})
    result3 = [dict(r) for r in changed["predictions"][0]["result"]]
    k3 = next(k for k, r in enumerate(result3) if r["value"]["brushlabels"][0] in ("cat", "dog", "car"))
    old = result3[k3]["value"]["brushlabels"][0]
    new = "cat" if old != "cat" else "car"
    result3[k3] = {**result3[k3], "value": {**result3[k3]["value"], "brushlabels": [new]}}
    _api(url, token, "POST", f"/api/tasks/{changed['id']}/annotations", json={"result": result3})
    skipped = sorted(tasks, key=lambda t: t["id"])[3]  # and skips the fourth
    _api(url, token, "POST", f"/api/tasks/{skipped['id']}/annotations", json={"result": [], "was_cancelled": True})

    reviewed = tmp_path / "reviewed"
    assert main(["review", "pull", "--label-studio", url, "--project", "review-1", "--out", str(reviewed)]) == 0
    out = capsys.readouterr().out
    assert "3 reviewed image(s)" in out and "1 pending, 1 skipped" in out, out
    assert f"  skipped: task {skipped['id']}  {skipped['data']['image_id']}" in out, out
    assert json.loads((reviewed / "_fcclip" / "pull.json").read_text())["skipped"] == [
        {"uri": skipped["data"]["uri"], "image_id": skipped["data"]["image_id"], "task": skipped["id"]}]
    # pulled again into the same folder: a committed pull is never written over
    assert main(["review", "pull", "--label-studio", url, "--project", "review-1", "--out", str(reviewed)]) == 2
    assert "already holds a table" in capsys.readouterr().err
    pending = {t["data"]["image_id"] for t in tasks} - {accepted["data"]["image_id"], edited["data"]["image_id"],
                                                        changed["data"]["image_id"], skipped["data"]["image_id"]}
    assert all(p in out for p in pending)
    assert {p["image_id"] for p in json.loads((reviewed / "_fcclip" / "pull.json").read_text())["pending"]} == pending

    got = {r["image_id"]: r for r in pq.read_table(reviewed).to_pylist()}
    assert len(got) == 3
    for r in got.values():
        assert r["source"] == "human-reviewed" and r["reviewed_by"] == email and r["reviewed_at"] is not None
        assert r["status"] == "ok" and (r["width"], r["height"]) == (53, 37)
    masks = lambda r: [(s["label"], s["category_id"], s["is_thing"], decode_rle(s["rle"]).tobytes())
                       for s in r["segments"]]
    a = got[accepted["data"]["image_id"]]
    assert masks(a) == masks(by_id[a["image_id"]])  # pixel-identical to the model's
    assert [s["area"] for s in a["segments"]] == [s["area"] for s in by_id[a["image_id"]]["segments"]]
    np.testing.assert_allclose([s["bbox"] for s in a["segments"]], [s["bbox"] for s in by_id[a["image_id"]]["segments"]])
    e = got[edited["data"]["image_id"]]
    np.testing.assert_array_equal(decode_rle(e["segments"][thing]["rle"]), new_mask)
    assert e["segments"][thing]["area"] == int(new_mask.sum())
    c = got[changed["data"]["image_id"]]
    assert c["segments"][k3]["label"] == new
    assert c["segments"][k3]["category_id"] == next(cat.id for cat in VOCAB.categories if cat.names[0] == new)
    assert masks(c)[k3][3] == masks(by_id[c["image_id"]])[k3][3]

    # the reviewed output is a labeling output; merged, its rows replace the pseudo-labels of the same images
    merged = tmp_path / "merged"
    from fcclip_pipelines.lake import WriterLock

    with WriterLock(Destination(str(merged))):  # another merge into the same folder is running: refused, untouched
        assert main(["review", "merge", str(labels), str(reviewed), "--out", str(merged)]) == 2
        assert "is being written by another fcclip run" in capsys.readouterr().err
        assert not list(merged.glob("*.parquet"))
    assert main(["review", "merge", str(labels), str(reviewed), "--out", str(merged)]) == 0
    m = {r["image_id"]: r for r in pq.read_table(merged).to_pylist()}
    assert len(m) == 6 and sum(r["source"] == "human-reviewed" for r in m.values()) == 3
    assert masks(m[e["image_id"]]) == masks(e) and masks(m[rows[2]["image_id"]]) == masks(rows[2])

    # both are Delta tables, as a labeling output is: version 0 holds their part files; polars reads them as tables
    import polars as pl
    from deltalake import DeltaTable

    for folder, operation, count in ((reviewed, "review pull", 3), (merged, "review merge", 6)):
        table = DeltaTable(str(folder))
        assert table.version() == 0
        assert sorted(Path(u).name for u in table.file_uris()) == sorted(p.name for p in folder.glob("part-*.parquet"))
        assert table.history()[0]["fcclip.operation"] == operation
        frame = pl.scan_delta(str(folder)).select("image_id", "source").collect()
        assert frame.height == count and set(frame["image_id"]) == (set(got) if count == 3 else set(m))
        assert not (folder / "_fcclip" / "lock.json").exists()  # the writer's lock is released
    assert pl.scan_delta(str(merged)).filter(pl.col("source") == "human-reviewed").collect().height == 3


def test_an_image_changed_after_its_push_gets_a_new_task_and_its_old_review_is_stale(label_studio, tmp_path,
                                                                                    monkeypatch, capsys):
    """Tasks record the version of the image they were made of. An image whose object changed after its review (a
    nightly run labeled it again) is stale in the merge; picked and pushed again it gets a task of its own with the
    new masks, and pull takes each image's latest task (the earlier one superseded)."""
    from PIL import Image

    from fcclip.datasets.synthetic import write_images

    url, token, root, _ = label_studio
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    images = write_images(root / "changing", count=2, size=(37, 53), seed=7)
    labels, picks = tmp_path / "labels", tmp_path / "picks"
    make_output(labels, [str(p) for p in images], [(37, 53)] * 2, [0.9, 0.8], etags=["a", "b"])
    ls = ["--label-studio", url, "--project", "changing", "--document-root", str(root)]

    def night(name):  # pick what was not picked as it is now, push it, a reviewer accepts every new task
        assert main(["review", "pick", str(labels), "--count", "2", "--exclude", str(picks),
                     "--out", str(picks / f"{name}.parquet")]) == 0
        assert main(["review", "push", str(picks / f"{name}.parquet"), *ls]) == 0
        pushed = capsys.readouterr().out
        project = next(p for p in _api(url, token, "GET", "/api/projects")["results"] if p["title"] == "changing")
        tasks = _api(url, token, "GET", f"/api/tasks?project={project['id']}&fields=all&page_size=100")["tasks"]
        for t in tasks:
            if not t["annotations"]:
                _api(url, token, "POST", f"/api/tasks/{t['id']}/annotations",
                     json={"result": t["predictions"][0]["result"]})
        assert main(["review", "pull", "--label-studio", url, "--project", "changing",
                     "--out", str(tmp_path / name)]) == 0
        return pushed, tasks, capsys.readouterr().out

    pushed, tasks, pulled = night("night1")
    assert "2 task(s) added" in pushed and "2 reviewed image(s)" in pulled
    assert sorted((t["data"]["source_etag"], t["data"]["width"], t["data"]["height"]) for t in tasks) == [
        ("a", 53, 37), ("b", 53, 37)]
    # the first image's object is replaced by a larger picture, and the nightly run labels it again
    Image.new("RGB", (80, 60), (200, 30, 30)).save(images[0])
    new = make_output(labels, [str(p) for p in images], [(60, 80), (37, 53)], [0.9, 0.8], seed=3, etags=["a2", "b"])
    assert main(["review", "merge", str(labels), str(tmp_path / "night1"), "--out", str(tmp_path / "m1")]) == 0
    assert "1 review(s) left out: their image changed after it was reviewed" in capsys.readouterr().err
    m1 = pq.read_table(tmp_path / "m1").to_pylist()
    assert [(r["source"], r["source_etag"], r["width"]) for r in m1] == [
        ("model", "a2", 80), ("human-reviewed", "b", 53)]

    pushed, tasks, pulled = night("night2")
    assert "1 task(s) added to project 'changing' (0 already there)" in pushed
    assert "1 of them for images changed since their earlier task" in pushed
    latest = max(tasks, key=lambda t: t["id"])
    assert (latest["data"]["uri"], latest["data"]["source_etag"], latest["data"]["width"]) == (str(images[0]), "a2", 80)
    assert "2 reviewed image(s)" in pulled and "1 task(s) of images pushed again after they changed left out" in pulled
    reviewed = pq.read_table(tmp_path / "night2").to_pylist()
    assert sorted((r["uri"], r["source_etag"], r["width"], r["height"]) for r in reviewed) == [
        (str(images[0]), "a2", 80, 60), (str(images[1]), "b", 53, 37)]
    first = next(r for r in reviewed if r["uri"] == str(images[0]))
    assert [decode_rle(s["rle"]).tobytes() for s in first["segments"]] == [
        decode_rle(s["rle"]).tobytes() for s in new[0]["segments"]]  # the new content's masks, accepted
    assert main(["review", "merge", str(labels), str(tmp_path / "night2"), "--out", str(tmp_path / "m2")]) == 0
    assert "2 rows, 2 replaced by reviewed rows" in capsys.readouterr().out


def test_push_leaves_out_images_gone_or_changed_since_labeling(label_studio, s3_bucket, tmp_path, monkeypatch,
                                                                capsys):
    """A picked image deleted from its store, or replaced after it was labeled (a reviewer would see another picture
    under the masks), is not pushed: by size for a local file, by ETag on S3; push names each on stderr."""
    import boto3

    from fcclip.datasets.synthetic import write_images

    url, token, root, _ = label_studio
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    images = write_images(root / "stale", count=3, size=(37, 53), seed=11)
    s3 = boto3.client("s3")
    s3.upload_file(str(images[2]), s3_bucket, "photos/on-s3.jpg")
    on_s3 = f"s3://{s3_bucket}/photos/on-s3.jpg"
    uris = [str(images[0]), str(images[1]), str(images[2]), on_s3]
    etag = s3.head_object(Bucket=s3_bucket, Key="photos/on-s3.jpg")["ETag"]
    make_output(tmp_path / "labels", uris, [(37, 53)] * 4, [0.9, 0.8, 0.7, 0.6], etags=["a", "b", "c", etag])
    picks = str(tmp_path / "picks.parquet")
    assert main(["review", "pick", str(tmp_path / "labels"), "--count", "4", "--out", picks]) == 0
    other = write_images(tmp_path / "other", count=1, size=(37, 53), seed=12)[0]  # another picture, the same size
    images[0].unlink()
    images[1].write_bytes(other.read_bytes())
    s3.upload_file(str(other), s3_bucket, "photos/on-s3.jpg")
    capsys.readouterr()
    assert main(["review", "push", picks, "--label-studio", url, "--project", "stale", "--document-root",
                 str(root)]) == 0
    out, err = capsys.readouterr()
    assert "1 task(s) added to project 'stale'" in out, out
    assert "3 picked image(s) not pushed: gone from their store, or changed since they were labeled" in err, err
    assert f"  {images[0]}: it is gone" in err
    assert f"  {images[1]}: it changed after it was labeled ({images[1].stat().st_size} bytes, modified 20" in err
    assert f"  {on_s3}: it changed after it was labeled (ETag " in err
    project = next(p for p in _api(url, token, "GET", "/api/projects")["results"] if p["title"] == "stale")
    (task,) = _api(url, token, "GET", f"/api/tasks?project={project['id']}&fields=all&page_size=100")["tasks"]
    assert task["data"]["uri"] == str(images[2])


def test_an_image_without_segments_reviewed_as_such_is_a_row(label_studio, tmp_path, monkeypatch, capsys):
    """An image the model found nothing in (no prediction regions), submitted without regions: a reviewed row
    without segments at the image's size (the task's), not a task pending for ever."""
    from fcclip.datasets.synthetic import write_images

    url, token, root, _ = label_studio
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    (image,) = write_images(root / "empty", count=1, size=(37, 53), seed=9)
    labels = tmp_path / "labels"
    (row,) = make_output(labels, [str(image)], [(37, 53)], [0.9], etags=["e"])
    row.update(segments=[], margin=[], branches_agree=[], uncertainty=1.0)
    write_part(Destination(str(labels)), 0, pa.Table.from_pylist([row], schema=part_schema()),
               {"vocabulary": VOCAB.to_dict(), "run_id": "r"})
    assert main(["review", "pick", str(labels), "--count", "1", "--out", str(tmp_path / "picks.parquet")]) == 0
    assert main(["review", "push", str(tmp_path / "picks.parquet"), "--label-studio", url, "--project", "empty",
                 "--document-root", str(root)]) == 0
    project = next(p for p in _api(url, token, "GET", "/api/projects")["results"] if p["title"] == "empty")
    (task,) = _api(url, token, "GET", f"/api/tasks?project={project['id']}&fields=all&page_size=100")["tasks"]
    assert task["predictions"][0]["result"] == []
    _api(url, token, "POST", f"/api/tasks/{task['id']}/annotations", json={"result": []})
    capsys.readouterr()
    assert main(["review", "pull", "--label-studio", url, "--project", "empty", "--out", str(tmp_path / "rev")]) == 0
    assert "1 reviewed image(s)" in capsys.readouterr().out
    (got,) = pq.read_table(tmp_path / "rev").to_pylist()
    assert (got["segments"], got["width"], got["height"], got["source_etag"]) == ([], 53, 37, "e")


def test_a_merge_killed_before_its_commit_is_merged_again_into_the_same_folder(tmp_path, capsys, caplog, monkeypatch):
    """`fcclip review merge` killed (SIGKILL) after writing some part files and before committing them: the same
    merge again into the same folder (its inputs typed otherwise: relative, a trailing slash) replaces them and
    commits; part files of anything else stay refused."""
    import sys

    from deltalake import DeltaTable

    from fcclip_pipelines.output import REVIEW_FIELDS, SCHEMA

    n = 400  # one row per part file: the merge takes seconds, time enough to be killed midway
    uris = [f"s3://bucket/img_{i:03d}.jpg" for i in range(n)]
    rows = make_output(tmp_path / "labels", uris, [(12, 16)] * n, [0.5] * n, files=n)
    when = datetime.datetime(2026, 12, 5, tzinfo=datetime.timezone.utc)
    reviewed_rows = [{**r, "source": "human-reviewed", "reviewed_by": "a@example.com", "reviewed_at": when}
                     for r in rows[:3]]
    write_part(Destination(str(tmp_path / "reviewed")), 0,
               pa.Table.from_pylist(reviewed_rows, schema=pa.schema(list(SCHEMA) + REVIEW_FIELDS)),
               {"vocabulary": VOCAB.to_dict(), "run_id": "reviewed"})
    labels, reviewed, merged = str(tmp_path / "labels"), str(tmp_path / "reviewed"), tmp_path / "merged"
    command = ["review", "merge", labels, reviewed, "--out", str(merged)]

    proc = subprocess.Popen([sys.executable, "-m", "fcclip_pipelines", *command], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(list(merged.glob("part-*.parquet"))) < 3:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate(timeout=60)[0]
    written = len(list(merged.glob("part-*.parquet")))
    assert proc.returncode == -signal.SIGKILL and 3 <= written < n, (proc.returncode, written, output[-2000:])
    assert not (merged / "_delta_log").exists()  # killed before its commit

    monkeypatch.chdir(tmp_path)
    assert main(["review", "merge", "labels/", "./reviewed", "--out", str(merged)]) == 0, capsys.readouterr().err
    assert f"holds {written} part file(s) of an unfinished merge of the same outputs" in caplog.text, caplog.text
    table = DeltaTable(str(merged))
    assert table.version() == 0 and len(table.file_uris()) == n == len(list(merged.glob("part-*.parquet")))
    got = table.to_pyarrow_table(columns=["uri", "source"]).to_pylist()
    assert sorted(r["uri"] for r in got) == sorted(uris)  # every row once
    assert sum(r["source"] == "human-reviewed" for r in got) == 3

    assert main(command) == 2  # committed: a table is never merged over
    assert "already holds a table" in capsys.readouterr().err
    # a labeling output given as REVIEWED (no review columns): one line, nothing written
    assert main(["review", "merge", labels, labels, "--out", str(tmp_path / "wrong")]) == 2
    assert "is not an output of fcclip review pull (no source column)" in capsys.readouterr().err
    assert not (tmp_path / "wrong").exists()
    other = tmp_path / "other"
    make_output(other, uris[:2], [(12, 16)] * 2, [0.5] * 2)  # part files of something else, no log
    assert main(["review", "merge", labels, reviewed, "--out", str(other)]) == 2
    assert "already holds part files" in capsys.readouterr().err
    assert len(list(other.glob("part-*.parquet"))) == 1 and not (other / "_delta_log").exists()


def test_a_merged_output_merged_again_keeps_its_earlier_reviews(tmp_path, capsys):
    """Reviews merged night after night (MERGED of one night is DEST of the next): a row reviewed earlier and not
    since keeps `human-reviewed`, its reviewer and time; a row reviewed again takes the newer review."""
    from fcclip_pipelines.output import REVIEW_FIELDS, SCHEMA

    uris = [f"s3://bucket/img_{i:03d}.jpg" for i in range(8)]
    rows = make_output(tmp_path / "labels", uris, [(12, 16)] * 8, [0.5] * 8, files=2)

    def review(name, picked, who, day):
        when = datetime.datetime(2026, 12, day, tzinfo=datetime.timezone.utc)
        write_part(Destination(str(tmp_path / name)), 0, pa.Table.from_pylist(
            [{**rows[i], "source": "human-reviewed", "reviewed_by": who, "reviewed_at": when} for i in picked],
            schema=pa.schema(list(SCHEMA) + REVIEW_FIELDS)), {"vocabulary": VOCAB.to_dict(), "run_id": name})
        return str(tmp_path / name)

    first, second = review("r1", [1, 2, 5], "a@example.com", 4), review("r2", [3, 2], "b@example.com", 5)
    assert main(["review", "merge", str(tmp_path / "labels"), first, "--out", str(tmp_path / "m1")]) == 0
    assert main(["review", "merge", str(tmp_path / "m1"), second, "--out", str(tmp_path / "m2")]) == 0
    assert "8 rows, 2 replaced by reviewed rows" in capsys.readouterr().out
    got = [(r["uri"], r["source"], r["reviewed_by"], r["reviewed_at"].day if r["reviewed_at"] else None)
           for f in sorted((tmp_path / "m2").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    model, a, b = ("model", None, None), ("human-reviewed", "a@example.com", 4), ("human-reviewed", "b@example.com", 5)
    assert got == [(u, *w) for u, w in zip(uris, [model, a, b, b, model, a, model, model])]  # DEST's order

    # the first night's pull merged again by mistake: its review of img_002 is older than the one m2 holds, which
    # stays; its reviews of img_001 and img_005 are the ones m2 holds (the same time): the same rows
    assert main(["review", "merge", str(tmp_path / "m2"), first, "--out", str(tmp_path / "m3")]) == 0
    out, err = capsys.readouterr()
    assert "8 rows, 2 replaced by reviewed rows" in out
    assert f"1 review(s) left out: DEST holds a newer review of the image, which stays: {uris[2]}" in err, err
    again = [(r["uri"], r["source"], r["reviewed_by"], r["reviewed_at"].day if r["reviewed_at"] else None)
             for f in sorted((tmp_path / "m3").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert again == got
    # reviews of another table's images: refused, nothing written; some of them: counted
    other = make_output(tmp_path / "other", [f"s3://other/img_{i}.jpg" for i in range(3)], [(12, 16)] * 3,
                        [0.5] * 3)
    assert main(["review", "merge", str(tmp_path / "other"), first, "--out", str(tmp_path / "m4")]) == 2
    assert f"none of the 3 image(s) reviewed in {first} is in {tmp_path / 'other'}" in capsys.readouterr().err
    assert not (tmp_path / "m4").exists() and len(other) == 3
    make_output(tmp_path / "part", uris[:2], [(12, 16)] * 2, [0.5] * 2)
    assert main(["review", "merge", str(tmp_path / "part"), first, "--out", str(tmp_path / "m5")]) == 0
    out, err = capsys.readouterr()
    assert "2 rows, 1 replaced by reviewed rows" in out and "2 reviewed image(s) are not in" in err, (out, err)


def test_a_review_of_an_image_changed_since_is_left_out_and_the_image_can_be_picked_again(tmp_path, capsys):
    """An image relabeled after its review (its object changed: a new ETag, another size) keeps its new pseudo-labels
    in MERGED, and the merge names the stale review; a later pick may pick it again, while the unchanged images of
    earlier pick lists and of REVIEWED stay left out. A review or pick list that recorded no version (made before
    they did) matches any."""
    from fcclip_pipelines.output import REVIEWED_SCHEMA

    uris = [f"s3://bucket/img_{i}.jpg" for i in range(4)]
    labels, picks = tmp_path / "labels", tmp_path / "picks"
    rows = make_output(labels, uris, [(12, 16)] * 4, [0.9, 0.8, 0.7, 0.1], etags=["e0", "e1", "e2", "e3"])
    assert main(["review", "pick", str(labels), "--count", "3", "--out", str(picks / "n1.parquet")]) == 0
    picked = review.read_picks(str(picks / "n1.parquet")).table.to_pylist()
    assert [(p["uri"], p["source_etag"], p["width"], p["height"]) for p in picked] == [
        (u, e, 16, 12) for u, e in zip(uris, ["e0", "e1", "e2"])]
    when = datetime.datetime(2026, 12, 5, tzinfo=datetime.timezone.utc)
    reviewed = [{**r, "source": "human-reviewed", "reviewed_by": "a@example.com", "reviewed_at": when}
                for r in rows[:3]]
    reviewed[2].update(source_etag=None, source_size=None, source_mtime=None)
    write_part(Destination(str(tmp_path / "reviewed")), 0, pa.Table.from_pylist(reviewed, schema=REVIEWED_SCHEMA),
               {"vocabulary": VOCAB.to_dict(), "run_id": "reviewed"})
    # img_1's object is replaced by another picture and labeled again; the others are as they were
    new = make_output(labels, uris, [(12, 16), (20, 30), (12, 16), (12, 16)], [0.9, 0.8, 0.7, 0.1],
                      etags=["e0", "e1-new", "e2", "e3"])

    merged = tmp_path / "merged"
    assert main(["review", "merge", str(labels), str(tmp_path / "reviewed"), "--out", str(merged)]) == 0
    out, err = capsys.readouterr()
    assert "4 rows, 2 replaced by reviewed rows" in out
    assert "1 review(s) left out: their image changed after it was reviewed" in err and uris[1] in err
    got = pq.read_table(merged).to_pylist()
    assert [(r["source"], r["source_etag"], r["width"], r["height"]) for r in got] == [
        ("human-reviewed", "e0", 16, 12), ("model", "e1-new", 30, 20), ("human-reviewed", "e2", 16, 12),
        ("model", "e3", 16, 12)]  # the version columns are DEST's (where the review recorded none too)
    assert got[1]["segments"] == new[1]["segments"] and got[0]["segments"] == reviewed[0]["segments"]
    assert all(s["rle"]["size"] == [r["height"], r["width"]] for r in got for s in r["segments"])

    # the next night's pick: img_1 is new content, the others were picked (or reviewed) as they are
    def pick(*exclude):
        assert main(["review", "pick", str(labels), "--count", "4", *exclude, "--out", str(tmp_path / "n.parquet")]) \
            == 0
        capsys.readouterr()
        return [p["uri"] for p in review.read_picks(str(tmp_path / "n.parquet")).table.to_pylist()]

    assert pick("--exclude", str(picks)) == [uris[1], uris[3]]
    assert pick("--exclude", str(tmp_path / "reviewed")) == [uris[1], uris[3]]  # img_2's review matches any version
    old = tmp_path / "old.parquet"  # a pick list written before lists recorded versions: by image id alone
    table = pq.read_table(picks / "n1.parquet")
    pq.write_table(table.select(["rank", "uri", "image_id", "score", "why"]), old)
    assert pick("--exclude", str(old)) == [uris[3]]
    assert review.read_picks(str(old)).table.column("source_etag").null_count == 3


def test_codec_matches_label_studios_own(label_studio, tmp_path):
    """Label Studio's own converter decodes our RLE to the same pixels, and we decode its encoding."""
    python = Path(_label_studio_bin()).parent / "python"
    rng = np.random.default_rng(0)
    masks = [rng.random((19, 23)) < 0.4, np.zeros((5, 3), bool), np.ones((7, 11), bool)]
    masks.append(np.hypot(*np.mgrid[:41, :29] - 15) < 11)
    ours = [brush.encode(m) for m in masks]
    script = (
        "import json, sys, numpy as np\n"
        "from label_studio_sdk.converter import brush as b\n"
        "data = json.load(sys.stdin)\n"
        "out = {'decoded': [], 'encoded': []}\n"
        "for rle, (h, w) in zip(data['ours'], data['shapes']):\n"
        "    out['decoded'].append(np.reshape(b.decode_rle(rle), [h, w, 4])[:, :, 3].tolist())\n"
        "for m in data['masks']:\n"
        "    out['encoded'].append(b.mask2rle((np.array(m, np.uint8) * 255)))\n"
        "json.dump(out, sys.stdout)\n")
    proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120,
                          input=json.dumps({"ours": ours, "shapes": [m.shape for m in masks],
                                            "masks": [m.astype(int).tolist() for m in masks]}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout)
    for m, decoded, encoded in zip(masks, theirs["decoded"], theirs["encoded"]):
        np.testing.assert_array_equal(np.array(decoded) == 255, m)
        np.testing.assert_array_equal(brush.decode(encoded, *m.shape), m)


def test_object_store_images_get_presigned_urls(s3_bucket):
    """An s3:// image reaches the reviewer's browser through a presigned URL (no credentials in it)."""
    import boto3
    import requests

    from fcclip_pipelines.label_studio import _image_url

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="photos/a.jpg", Body=b"jpeg bytes")
    url, folder = _image_url(f"s3://{s3_bucket}/photos/a.jpg", None, expiry=600)
    assert folder is None and url.startswith("http") and "Signature" in url
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in url
    assert requests.get(url, timeout=30).content == b"jpeg bytes"
    assert _image_url("https://example.com/x.jpg", None, 600) == ("https://example.com/x.jpg", None)
    from fcclip_pipelines.label_studio import LabelStudioError

    with pytest.raises(LabelStudioError, match="--document-root"):
        _image_url("/data/x.jpg", None, 600)
    with pytest.raises(LabelStudioError, match="not under --document-root"):
        _image_url("/elsewhere/x.jpg", "/data", 600)


def test_personal_access_tokens_work_too(label_studio, tmp_path, monkeypatch, capsys):
    """A personal access token (a JWT refresh token, Label Studio 1.23's default kind) is exchanged for access
    tokens: the same pull through it."""
    from fcclip_pipelines.label_studio import LabelStudio

    url, token, root, email = label_studio
    pat = _api(url, token, "POST", "/api/token/")["token"]
    assert pat.count(".") == 2
    client = LabelStudio(url, pat)
    assert client._auth().startswith("Bearer ")
    client.request("POST", "/api/projects", json={"title": "made with a personal token"})
    assert "made with a personal token" in {p["title"] for p in LabelStudio(url, token).projects()}
    assert {p["title"] for p in client.projects()} == {p["title"] for p in LabelStudio(url, token).projects()}
    with pytest.raises(Exception, match="personal access token was refused"):
        LabelStudio(url, pat[:-4] + "AAAA").projects()


def test_annotation_regions_become_panoptic_segments():
    """Regions painted in order (a later one takes shared pixels), regions of one stuff class merged, labels not in
    the vocabulary left out and reported, labels matched by any name of their class; config round trip."""
    from fcclip_pipelines.label_studio import annotation_segments, config_vocabulary, labeling_config

    vocabulary = VOCAB.to_dict()
    assert config_vocabulary(labeling_config(vocabulary)) == vocabulary
    h, w = 9, 11
    a = np.zeros((h, w), bool)
    a[:5, :6] = True  # a cat
    b = np.zeros((h, w), bool)
    b[3:7, 4:9] = True  # a car over part of the cat
    sky1 = np.zeros((h, w), bool)
    sky1[0, 6:] = True
    sky2 = np.zeros((h, w), bool)
    sky2[8, :] = True
    hidden = np.zeros((h, w), bool)
    hidden[4, 5] = True  # a dog entirely under the car painted after it

    def region(mask, label):
        return {"type": "brushlabels", "original_height": h, "original_width": w,
                "value": {"format": "rle", "rle": brush.encode(mask), "brushlabels": [label]}}

    result = [region(a, "cat"), region(hidden, "puppy"), region(b, "car"), region(sky1, "sky"),
              region(sky2, "sky"), region(a, "zebra"), {"type": "textarea", "value": {"text": ["note"]}}]
    segments, unknown = annotation_segments(result, h, w, vocabulary)
    assert unknown == ["zebra"]
    assert [(s["id"], s["label"]) for s in segments] == [(1, "cat"), (2, "car"), (3, "sky")]
    masks = [decode_rle(s["rle"]) for s in segments]
    np.testing.assert_array_equal(masks[0], a & ~b)
    np.testing.assert_array_equal(masks[1], b)
    np.testing.assert_array_equal(masks[2], sky1 | sky2)
    assert [s["area"] for s in segments] == [int(m.sum()) for m in masks]
    assert not (masks[0] & masks[1]).any() and not (masks[1] & masks[2]).any()
    assert [s["is_thing"] for s in segments] == [True, True, False] and all(s["score"] == 1.0 for s in segments)


def test_merge_of_a_table_another_program_compacted(tmp_path, capsys):
    """DEST's part files compacted by deltalake's OPTIMIZE (one file, no fcclip footer metadata): the merge takes the
    run's metadata from DEST's table and its rows from the compacted file; MERGED reads as a labeling output."""
    from deltalake import DeltaTable

    from fcclip_pipelines.lake import commit_version
    from fcclip_pipelines.output import REVIEW_FIELDS, SCHEMA, open_output

    uris = [f"s3://bucket/img_{i}.jpg" for i in range(6)]
    labels = tmp_path / "labels"
    rows = make_output(labels, uris, [(12, 16)] * 6, [0.5] * 6, files=3)
    commit_version(Destination(str(labels)), [f"part-{i:06d}.parquet" for i in range(3)], info={"shards": [0, 1, 2]})
    DeltaTable(str(labels)).optimize.compact()
    (compacted,) = DeltaTable(str(labels)).file_uris()
    assert b"fcclip.vocabulary" not in (pq.read_metadata(compacted).metadata or {})
    when = datetime.datetime(2026, 12, 5, tzinfo=datetime.timezone.utc)
    write_part(Destination(str(tmp_path / "reviewed")), 0,
               pa.Table.from_pylist([{**rows[1], "source": "human-reviewed", "reviewed_by": "a@example.com",
                                      "reviewed_at": when}], schema=pa.schema(list(SCHEMA) + REVIEW_FIELDS)),
               {"vocabulary": VOCAB.to_dict(), "run_id": "reviewed"})
    merged = str(tmp_path / "merged")
    assert main(["review", "merge", str(labels), str(tmp_path / "reviewed"), "--out", merged]) == 0, \
        capsys.readouterr().err
    output = open_output(merged)
    assert [c["id"] for c in output.categories()] == [c.id for c in VOCAB.categories]
    got = output.read(columns=["uri", "source"]).to_pylist()
    assert sorted(r["uri"] for r in got) == sorted(uris)
    assert [r["uri"] for r in got if r["source"] == "human-reviewed"] == [uris[1]]
