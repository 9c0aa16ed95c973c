"""`fcclip show`: an HTML report of a labeling output, checked against DuckDB and rendered in headless Chromium.

The labeling output is written directly in the documented schema (fcclip_pipelines.output), with real COCO RLEs of masks
on synthetic images, so these tests need no Ray and no model.
"""
import base64
import html
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import fsspec
import fsspec.implementations.local
import numpy as np
import pytest
from PIL import Image

import fcclip_pipelines.show as show
from fcclip.datasets.synthetic import synthetic_image, write_images
from fcclip.masks import encode_rle, mask_to_bbox
from fcclip.vocabulary import load_vocabulary
from fcclip_pipelines.output import encode_part, part_name
from fcclip_pipelines.stages import image_id

VOCAB = load_vocabulary("cat; dog, puppy; grass [stuff]; sky [stuff]")
THRESHOLDS = {"alpha": 0.4, "beta": 0.8, "object_mask_threshold": 0.8, "overlap_threshold": 0.8, "min_score": 0.0}
RUN_ID = "0123456789abcdef"
MODEL = "fcclip-tiny@random"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _segments(rng: np.random.Generator, height: int, width: int) -> list[dict]:
    """A panoptic labeling of an image: sky over grass, a dog box and sometimes a cat disc (ids 1..n, no overlap)."""
    seg = np.zeros((height, width), dtype=np.int32)
    horizon = int(height * rng.uniform(0.35, 0.6))
    seg[:horizon] = 1
    seg[horizon:] = 2
    kinds = [("sky", 4), ("grass", 3)]
    y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    seg[y0:y0 + height // 3, x0:x0 + width // 3] = 3
    kinds.append(("dog", 2))
    if rng.random() < 0.6:
        yy, xx = np.mgrid[:height, :width]
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), min(height, width) / 5
        seg[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 4
        kinds.append(("cat", 1))
    segments = []
    for segment_id, (label, category_id) in enumerate(kinds, start=1):
        mask = seg == segment_id
        if not mask.any():
            continue
        segments.append({
            "id": segment_id, "label": label, "category_id": category_id, "is_thing": category_id <= 2,
            "score": float(np.float32(rng.uniform(0.3, 1.0))), "area": int(mask.sum()),
            "bbox": mask_to_bbox(mask), "rle": encode_rle(mask),
        })
    return segments


def _ok_row(uri: str, height: int, width: int, rng: np.random.Generator) -> dict:
    return {"uri": uri, "image_id": image_id(uri), "width": width, "height": height, "status": "ok", "error": None,
            "segments": _segments(rng, height, width), "model": MODEL, "vocabulary": f"custom@{VOCAB.digest[:16]}",
            "run_id": RUN_ID}


def _error_row(uri: str, error: str) -> dict:
    return {"uri": uri, "image_id": image_id(uri), "width": None, "height": None, "status": "error", "error": error,
            "segments": [], "model": MODEL, "vocabulary": f"custom@{VOCAB.digest[:16]}", "run_id": RUN_ID}


def _rows(image_uris: list[str], sizes: list[tuple[int, int]], missing_prefix: str) -> list[dict]:
    rng = np.random.default_rng(7)
    rows = [_ok_row(uri, h, w, rng) for uri, (h, w) in zip(image_uris, sizes)]
    errors = [
        _error_row(f"{missing_prefix}/gone_1.jpg",
                   f"not found: [Errno 2] No such file or directory: '{missing_prefix}/gone_1.jpg'"),
        _error_row(f"{missing_prefix}/notes.jpg",
                   "ImageDecodeError: image bytes (1234 bytes): not an image, or a format Pillow cannot read"),
        _error_row(f"{missing_prefix}/gone_2.jpg",
                   f"not found: [Errno 2] No such file or directory: '{missing_prefix}/gone_2.jpg'"),
    ]
    return rows[:4] + errors[:2] + rows[4:] + errors[2:]  # error rows in both files


def _write_output(rows: list[dict], write, shard_size: int = 7) -> None:
    meta = {"run_id": RUN_ID, "vocabulary": VOCAB.to_dict(), "thresholds": THRESHOLDS, "model": "fcclip-tiny",
            "weights": "random"}
    for shard, start in enumerate(range(0, len(rows), shard_size)):
        write(part_name(shard), encode_part(rows[start:start + shard_size], meta))


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """A local labeling output: 10 ok images (one large, one deleted after labeling) and 3 error rows, 2 files."""
    root = tmp_path_factory.mktemp("show")
    paths = write_images(root / "images", count=9, size=(96, 128), seed=3)
    big = root / "images" / "big.png"
    Image.fromarray(synthetic_image(99, 720, 1000)).save(big)
    paths.append(big)
    sizes = [(96, 128)] * 9 + [(720, 1000)]
    rows = _rows([str(p) for p in paths], sizes, str(root / "images"))
    dest = root / "labels"
    (dest / "_fcclip").mkdir(parents=True)
    (dest / "_fcclip" / "run.json").write_text("{}")  # bookkeeping that is not output

    def write(name, data):
        (dest / name).write_bytes(data)

    _write_output(rows, write)
    deleted = paths[2]
    deleted.unlink()  # labeled, then gone: the report shows a placeholder
    return {"dest": dest, "rows": rows, "deleted": str(deleted), "big": str(big), "root": root}


class _Page(HTMLParser):
    """Elements with an id or data attributes, their text; img sources; figures of the gallery."""

    def __init__(self):
        super().__init__()
        self.elements: list[dict] = []
        self.open: list[dict] = []
        self.images: list[str] = []
        self.figures: list[dict] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if name in attrs:
                self.links.append(attrs[name])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "figure" and "sample" in (attrs.get("class") or ""):
            self.figures.append(attrs)
        if "id" in attrs or "data-metric" in attrs:
            element = {"tag": tag, "attrs": attrs, "text": ""}
            self.elements.append(element)
            self.open.append(element)

    def handle_endtag(self, tag):
        if self.open and self.open[-1]["tag"] == tag:
            self.open.pop()

    def handle_data(self, data):
        for element in self.open:
            element["text"] += data

    def by_id(self, element_id: str) -> dict:
        return next(e for e in self.elements if e["attrs"].get("id") == element_id)

    def metric(self, metric: str, key: str = "label") -> dict[str, int]:
        """{data-label (or other key): value} of the cells of one metric; checks the text shows the same number."""
        out = {}
        for e in self.elements:
            if e["attrs"].get("data-metric") == metric:
                value = int(e["attrs"]["data-value"])
                assert int(e["text"].replace(",", "")) == value, e
                out[e["attrs"].get(f"data-{key}")] = value
        return out


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _run(dest, out, *extra) -> str:
    code = show.main([str(dest), "--out", str(out), *extra])
    assert code == 0
    return Path(out).read_text(encoding="utf-8")


def _assert_self_contained(page: str, parser: _Page) -> None:
    assert parser.links and all(link.startswith("data:") for link in parser.links), parser.links
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", page, re.I)
    assert not re.search(r"url\(\s*[\"']?(?:https?:)?//", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()


def _duckdb_numbers(glob: str, con=None) -> dict:
    con = con or duckdb.connect()
    q = lambda sql: con.sql(sql.replace("FILES", f"read_parquet('{glob}')")).fetchall()  # noqa: E731
    (images, ok, errors), = q("select count(*), count(*) filter (status = 'ok'), count(*) filter (status = 'error') "
                              "from FILES")
    segments = q("select count(*) from (select unnest(segments) s from FILES)")[0][0]
    per_class = q("select s.label, count(*), count(distinct uri) from (select uri, unnest(segments) s from FILES) "
                  "group by 1")
    bins = q(f"select least(greatest(floor(s.score * {show.SCORE_BINS}), 0), {show.SCORE_BINS - 1})::int b, count(*) "
             "from (select unnest(segments) s from FILES) group by 1")
    per_image = dict(q("select uri, len(segments) from FILES where status = 'ok'"))
    return {"images": images, "ok": ok, "error": errors, "segments": segments,
            "segments_per_class": {label: n for label, n, _ in per_class},
            "images_per_class": {label: n for label, _, n in per_class},
            "bins": dict(bins), "per_image": per_image}


def test_numbers_match_duckdb(labels, tmp_path):
    page = _run(labels["dest"], tmp_path / "report.html", "--sample", "4", "--seed", "1")
    parser = _parse(page)
    _assert_self_contained(page, parser)
    expected = _duckdb_numbers(f"{labels['dest']}/*.parquet")
    assert expected["images"] == 13 and expected["error"] == 3  # the fixture is what the test thinks it is

    for key in ("images", "ok", "error", "segments"):
        element = parser.by_id(f"count-{key}")
        assert int(element["attrs"]["data-value"]) == expected[key] == int(element["text"].replace(",", "")), key
    assert int(parser.by_id("count-files")["attrs"]["data-value"]) == 2  # _fcclip/ is not output
    assert int(parser.by_id("count-sampled")["attrs"]["data-value"]) == 4

    assert parser.metric("segments") == expected["segments_per_class"]
    assert parser.metric("images") == expected["images_per_class"]
    histogram = re.search(r'<svg class="chart histogram" data-histogram="all" data-count="(\d+)"(.*?)</svg>', page,
                          re.S)
    assert int(histogram.group(1)) == expected["segments"]
    bars = [int(n) for n in re.findall(r'data-count="(\d+)"', histogram.group(2))]
    assert bars == [expected["bins"].get(b, 0) for b in range(show.SCORE_BINS)]
    for label in expected["segments_per_class"]:  # a histogram per class (4 classes < --top-classes 8)
        assert re.search(rf'data-histogram="{label}" data-count="{expected["segments_per_class"][label]}"', page)

    reasons = parser.metric("errors", key="reason")
    assert sum(reasons.values()) == expected["error"]
    assert reasons == {"not found: [Errno #] No such file or directory: '<uri>'": 2,
                       "ImageDecodeError: image bytes (# bytes): not an image, or a format Pillow cannot read": 1}
    error_uris = set(re.findall(r'<tr data-uri="([^"]+)">', page))
    assert error_uris == {r["uri"] for r in labels["rows"] if r["status"] == "error"}

    header = parser.by_id("run")["text"]
    for text in (RUN_ID, MODEL, f"custom@{VOCAB.digest[:16]}", "4 classes", "object_mask_threshold = 0.8", "random"):
        assert text in header, text


def test_gallery(labels, tmp_path, monkeypatch):
    import fcclip_pipelines.output

    decoded = []
    real_decode = fcclip_pipelines.output.decode_rle
    monkeypatch.setattr(fcclip_pipelines.output, "decode_rle", lambda rle: decoded.append(rle) or real_decode(rle))
    page = _run(labels["dest"], tmp_path / "all.html", "--sample", "50")
    parser = _parse(page)
    ok = {r["uri"]: r for r in labels["rows"] if r["status"] == "ok"}
    assert sorted(f["data-uri"] for f in parser.figures) == sorted(ok)  # N > ok images: every ok image
    readable = {u: r for u, r in ok.items() if u != labels["deleted"]}  # a missing image is not decoded
    assert len(decoded) == sum(len(r["segments"]) for r in readable.values())
    for figure in parser.figures:
        assert int(figure["data-segments"]) == len(ok[figure["data-uri"]]["segments"])
    failed = [f for f in parser.figures if f.get("data-error")]
    assert [f["data-uri"] for f in failed] == [labels["deleted"]]
    assert re.search(r'class="placeholder" data-reason="FileNotFoundError: [^"]*No such file', page)
    assert len(parser.images) == len(ok) - 1
    sizes = []
    for src in parser.images:
        assert src.startswith("data:image/jpeg;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        sizes.append(image.size)
        assert np.asarray(image).std() > 10  # a picture, not a blank
    assert set(sizes) == {(128, 96), (640, 461)}  # the large image scaled down to the width, the small ones as they are

    decoded.clear()  # with a small sample, only the sampled rows' masks are decoded
    page = _run(labels["dest"], tmp_path / "three.html", "--sample", "3")
    sampled = [f["data-uri"] for f in _parse(page).figures]
    assert len(sampled) == 3
    assert len(decoded) == sum(len(readable[u]["segments"]) for u in sampled if u in readable)


def test_an_image_replaced_since_labeling_is_not_drawn_under_the_old_masks(tmp_path):
    """A row with its object's version (a committed shard's source columns) whose local file was replaced since by
    another picture of the same size: a placeholder naming why, not the old masks over the new picture."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fcclip_pipelines.output import SOURCE_FIELDS, stat_version

    paths = write_images(tmp_path / "images", count=2, size=(96, 128), seed=5)
    rng = np.random.default_rng(1)
    rows = [_ok_row(str(p), 96, 128, rng) for p in paths]
    meta = {"run_id": RUN_ID, "vocabulary": VOCAB.to_dict(), "thresholds": THRESHOLDS, "model": "fcclip-tiny",
            "weights": "random"}
    table = pq.read_table(io.BytesIO(encode_part(rows, meta)))
    versions = [stat_version(os.stat(p)) for p in paths]
    for fld in SOURCE_FIELDS:
        table = table.append_column(fld, pa.array([v[fld.name] for v in versions], fld.type))
    (tmp_path / "labels").mkdir()
    pq.write_table(table, tmp_path / "labels" / part_name(0))
    other = write_images(tmp_path / "other", count=1, size=(96, 128), seed=6)[0]
    paths[0].write_bytes(other.read_bytes())
    page = _run(tmp_path / "labels", tmp_path / "report.html", "--sample", "5")
    figures = _parse(page).figures
    assert sorted(f["data-uri"] for f in figures) == sorted(map(str, paths))
    assert [f["data-uri"] for f in figures if f.get("data-error")] == [str(paths[0])]
    assert 'data-reason="ImageChanged: it changed after it was labeled (' in page


def test_sample_is_seeded(labels, tmp_path):
    def sample(dest, seed, n=3):
        return [s.uri for s in show.scan(str(dest), sample=n, seed=seed).sample]

    first = sample(labels["dest"], 0)
    assert len(first) == 3 and sample(labels["dest"], 0) == first
    # another seed, another sample (3 of the fixture's images: two seeds pick the same three about once in 84, as the
    # images' ids depend on the temporary folder's name; ten seeds all picking them never do)
    assert any(sample(labels["dest"], seed) != first for seed in range(1, 11))
    assert set(sample(labels["dest"], 0, n=10)) == {r["uri"] for r in labels["rows"] if r["status"] == "ok"}
    # the same rows in other files (one file, other row groups) give the same sample
    one = tmp_path / "one"
    one.mkdir()
    _write_output(labels["rows"], lambda name, data: (one / name).write_bytes(data), shard_size=100)
    assert len(list(one.glob("*.parquet"))) == 1
    assert sample(one, 0) == first


def _refused(dest, tmp_path, capsys) -> str:
    """Run fcclip show on DEST, which is not a labeling output: exit 2, no report, one line on stderr; that line."""
    report = tmp_path / "refused.html"
    assert show.main([str(dest), "--out", str(report)]) == 2
    captured = capsys.readouterr()
    assert not report.exists()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcclip show: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_not_a_labeling_output(labels, tmp_path, capsys):
    import pandas as pd

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is not a labeling output: it holds no part file" in _refused(empty, tmp_path, capsys)
    assert "is not a labeling output: no such folder" in _refused(tmp_path / "nope", tmp_path, capsys)

    # someone else's Parquet files, one of them even named like a part file
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pd.DataFrame({"id": [1, 2], "name": ["a", "b"]}).to_parquet(foreign / "part-000000.parquet")
    pd.DataFrame({"x": [0.5]}).to_parquet(foreign / "other.parquet")
    line = _refused(foreign, tmp_path, capsys)
    assert "is not a labeling output: 2 Parquet files but none written by fcclip label" in line
    assert "other.parquet, part-000000.parquet" in line and "no column 'uri'" in line

    # the output's columns but not its metadata (rows copied out with pandas)
    copied = tmp_path / "copied"
    copied.mkdir()
    pd.read_parquet(labels["dest"] / "part-000000.parquet").to_parquet(copied / "part-000000.parquet")
    assert "no fcclip.vocabulary metadata" in _refused(copied, tmp_path, capsys)

    # a labeling output with a foreign file beside it: refused, not counted in
    mixed = tmp_path / "mixed"
    shutil.copytree(labels["dest"], mixed)
    pd.DataFrame({"id": [1]}).to_parquet(mixed / "zz-notes.parquet")
    line = _refused(mixed, tmp_path, capsys)
    assert "mixes a labeling output with 1 Parquet file that fcclip label did not write (zz-notes.parquet" in line

    # a part file that is not Parquet at all (truncated): named
    broken = tmp_path / "broken"
    shutil.copytree(labels["dest"], broken)
    data = (broken / "part-000001.parquet").read_bytes()
    (broken / "part-000001.parquet").write_bytes(data[: len(data) // 2])
    assert "cannot read part-000001.parquet as Parquet" in _refused(broken, tmp_path, capsys)


def test_object_storage(s3_server, s3_bucket, tmp_path):
    """DEST and the images in a bucket (moto on loopback), credentials from the environment."""
    import fsspec

    fs = fsspec.filesystem("s3")
    paths = write_images(tmp_path / "images", count=4, size=(64, 80), seed=11)
    uris = []
    for p in paths:
        uri = f"s3://{s3_bucket}/images/{p.name}"
        fs.put_file(str(p), uri)
        uris.append(uri)
    rows = _rows(uris, [(64, 80)] * 4, f"s3://{s3_bucket}/images")
    _write_output(rows, lambda name, data: fs.pipe_file(f"s3://{s3_bucket}/labels/{name}", data), shard_size=4)
    page = _run(f"s3://{s3_bucket}/labels/", tmp_path / "report.html", "--sample", "10")
    parser = _parse(page)
    assert sorted(f["data-uri"] for f in parser.figures) == sorted(uris)
    assert not [f for f in parser.figures if f.get("data-error")]
    assert int(parser.by_id("count-images")["attrs"]["data-value"]) == 7
    assert int(parser.by_id("count-error")["attrs"]["data-value"]) == 3


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"headless Chromium not installed ({CHROMIUM} is absent; "
                                                          "on Debian: apt-get install -y chromium)")
def test_renders_in_chromium(labels, tmp_path):
    report = tmp_path / "report.html"
    page = _run(labels["dest"], report, "--sample", "6")
    expected = _duckdb_numbers(f"{labels['dest']}/*.parquet")
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000"]
    shot = tmp_path / "report.png"
    run = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", report.as_uri()], capture_output=True,
                         timeout=60, text=True)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 20, "the screenshot is blank"
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 500  # pictures, not just text on white
    if os.environ.get("FCCLIP_SHOW_SCREENSHOT"):  # keep the picture to look at
        shutil.copy(shot, os.environ["FCCLIP_SHOW_SCREENSHOT"])

    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", report.as_uri()], capture_output=True, timeout=60,
                         text=True)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = _parse(dom.stdout)
    assert len(parser.figures) == 6 and len(parser.images) >= 5
    assert all(src.startswith("data:image/jpeg;base64,") for src in parser.images)
    assert parser.images == _parse(page).images  # the browser kept every image
    for key in ("images", "ok", "error", "segments"):
        assert int(parser.by_id(f"count-{key}")["text"].replace(",", "")) == expected[key]
    assert parser.metric("segments") == expected["segments_per_class"]
    assert dom.stdout.count("<svg") == 1 + 1 + len(expected["segments_per_class"])  # bars, all scores, per class


LONG_ERROR = ("model failed: RuntimeError: the forward pass ran out of memory while the pixel decoder was "
              "upsampling the multi-scale features of this unusually large panorama, so the image was skipped; "
              "lower --max-size or --batch-size and label it again ") * 3


@pytest.fixture(scope="module")
def glitches(tmp_path_factory):
    """The report's old glitches in one output: a 320 x 240 image with exactly one segment, one with two, and an
    error row with a long message of ordinary words."""
    root = tmp_path_factory.mktemp("glitches")
    images = []
    for name, n_segments in (("one.png", 1), ("two.png", 2)):
        path = root / name
        Image.fromarray(synthetic_image(5, 240, 320)).save(path)
        seg = np.zeros((240, 320), dtype=np.int32)
        seg[40:200, 60:260] = 1
        seg[:40] = 2 if n_segments == 2 else 0
        segments = [{"id": i, "label": label, "category_id": cid, "is_thing": cid <= 2, "score": 0.9,
                     "area": int((seg == i).sum()), "bbox": mask_to_bbox(seg == i), "rle": encode_rle(seg == i)}
                    for i, label, cid in ((1, "dog", 2), (2, "sky", 4))[:n_segments]]
        images.append({**_ok_row(str(path), 240, 320, np.random.default_rng(0)), "segments": segments})
    rows = images + [_error_row(str(root / "panorama.jpg"), LONG_ERROR)]
    dest = root / "labels"
    dest.mkdir()
    _write_output(rows, lambda name, data: (dest / name).write_bytes(data))
    return {"dest": dest, "one": str(root / "one.png")}


def test_report_glitches(glitches, tmp_path, capsys):
    page = _run(glitches["dest"], tmp_path / "report.html")
    out = capsys.readouterr().out
    assert "3 images: 2 ok, 1 failed, 3 segments; 2 drawn" in out
    assert not re.search(r"\b1 segments\b", page + out) and not re.search(r"\b1 images\b", page + out)
    one = re.search(rf'<figure class="sample" data-uri="{re.escape(glitches["one"])}".*?</figure>', page, re.S)
    assert "<b data-metric=\"sample-segments\">1</b> segment · 320 × 240" in one.group(0)
    for src in _parse(page).images:  # never scaled up: the overlays keep the images' own size
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.size == (320, 240)
    assert _parse(page).by_id("gallery-title")["text"] == "Sample (2 images)"

    _run(glitches["dest"], tmp_path / "small.html", "--image-width", "160")  # a smaller gallery scales down
    sizes = {Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size
             for src in _parse((tmp_path / "small.html").read_text()).images}
    assert sizes == {(160, 120)}


def _corrupt_data_pages(path: Path) -> None:
    """Flip the bytes of the first column chunk's pages (the footer stays intact: the file opens, reading fails)."""
    import pyarrow.parquet as pq

    column = pq.read_metadata(path).row_group(0).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start + 20, start + column.total_compressed_size - 4):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_corrupt_part_file(labels, tmp_path, capsys):
    dest = tmp_path / "labels"
    shutil.copytree(labels["dest"], dest)
    _corrupt_data_pages(dest / "part-000001.parquet")
    line = _refused(dest, tmp_path, capsys)
    assert f"cannot read {dest / 'part-000001.parquet'}: " in line


# Measures the laid-out page in the browser: each overlay's drawn width against its pixel width, and each line
# break inside the error messages (with the word it falls in and whether that word could fit on one line).
LAYOUT_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const out = {images: [], breaks: []};
  for (const img of document.querySelectorAll("img.overlay")) {
    out.images.push({natural: img.naturalWidth, drawn: img.getBoundingClientRect().width});
  }
  for (const cell of document.querySelectorAll("td.msg")) {
    const node = cell.firstChild;
    if (!node || node.nodeType !== Node.TEXT_NODE) continue;
    const text = node.textContent, range = document.createRange();
    let top = null;
    for (let i = 0; i < text.length; i++) {
      range.setStart(node, i); range.setEnd(node, i + 1);
      const rect = range.getClientRects()[0];
      if (!rect) continue;
      if (top !== null && rect.top > top + 2 && i > 0) {
        let a = i, b = i;
        while (a > 0 && !/\\s/.test(text[a - 1])) a--;
        while (b < text.length && !/\\s/.test(text[b])) b++;
        const word = text.slice(a, b), probe = document.createElement("span");
        probe.style.whiteSpace = "nowrap"; probe.textContent = word; cell.appendChild(probe);
        const wordWidth = probe.getBoundingClientRect().width; probe.remove();
        const style = getComputedStyle(cell);
        const room = cell.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
        out.breaks.push({before: text[i - 1], after: text[i], word: word, fits: wordWidth <= room});
      }
      top = rect.top;
    }
  }
  const pre = document.createElement("pre"); pre.id = "layout"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"headless Chromium not installed ({CHROMIUM} is absent; "
                                                          "on Debian: apt-get install -y chromium)")
def test_layout_in_chromium(glitches, tmp_path):
    """Small images are drawn at their size, not stretched; error text wraps between words."""
    import json

    page = _run(glitches["dest"], tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", LAYOUT_SCRIPT + "</body>"), encoding="utf-8")
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, timeout=60, text=True)
    assert dom.returncode == 0, dom.stderr[-2000:]
    layout = json.loads(html.unescape(re.search(r'<pre id="layout">(.*?)</pre>', dom.stdout, re.S).group(1)))
    assert [i["natural"] for i in layout["images"]] == [320, 320]
    assert all(abs(i["drawn"] - 320) < 1 for i in layout["images"]), layout["images"]
    assert len(layout["breaks"]) > 6, "the long messages should wrap over several lines"
    split_words = [b for b in layout["breaks"] if not b["before"].isspace() and b["before"] != "-" and b["fits"]]
    assert not split_words, split_words  # a word that fits on a line is never cut


class _RecordingFS(fsspec.implementations.local.LocalFileSystem):
    """The local filesystem under the protocol ``recording://``, remembering every byte range read."""

    protocol = ("recording",)
    reads: list[tuple[str, int, int]] = []

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        read = f.read

        def recorded(n=-1):
            start = f.tell()
            data = read(n)
            _RecordingFS.reads.append((self._strip_protocol(path), start, start + len(data)))
            return data

        f.read = recorded
        return f


def test_scan_never_reads_the_masks(tmp_path):
    """The counts read the row columns and the segments' labels and scores, not the RLE column chunks (beyond the
    last 64 KiB of a file, which pyarrow reads at once with the footer)."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    rows = []
    for i in range(24):
        segments = [{"id": j + 1, "label": ["cat", "dog"][j % 2], "category_id": 1 + j % 2, "is_thing": True,
                     "score": 0.5, "area": 1, "bbox": [0.0, 0.0, 1.0, 1.0],
                     "rle": encode_rle(rng.random((160, 160)) < 0.5)}  # noise: long RLEs
                    for j in range(4)]
        rows.append({**_ok_row(f"/img/{i}.jpg", 160, 160, rng), "segments": segments})
    dest = tmp_path / "labels"
    dest.mkdir()
    _write_output(rows, lambda name, data: (dest / name).write_bytes(data), shard_size=12)

    fsspec.register_implementation("recording", _RecordingFS, clobber=True)
    _RecordingFS.reads.clear()
    report = show.scan(f"recording://{dest}", sample=0)
    assert report.images == 24 and report.segments == 96 and {c.label: c.segments for c in report.classes} == {
        "cat": 48, "dog": 48}
    for path in sorted(dest.glob("*.parquet")):
        meta = pq.read_metadata(path)
        spans = []
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                column = meta.row_group(g).column(c)
                if column.path_in_schema.startswith("segments.list.element.rle."):
                    start = column.dictionary_page_offset or column.data_page_offset
                    spans.append((start, start + column.total_compressed_size))
        size = path.stat().st_size
        assert sum(b - a for a, b in spans) > size / 2  # the masks are most of the file
        tail = size - 64 * 1024
        for name, a, b in _RecordingFS.reads:
            if name == str(path) and a < tail:  # a read before the footer's window touches no mask
                assert not [s for s in spans if a < s[1] and s[0] < min(b, tail)], (path, a, b, spans)
