"""``fcclip review push`` and ``pull``: a pick list to a Label Studio project and its annotations back.

Label Studio is reached over its REST API with the token in ``LABEL_STUDIO_API_KEY`` (never a flag, never written
anywhere): a legacy API token (``Authorization: Token ...``), or a personal access token (a JWT refresh token,
exchanged at ``/api/token/refresh/`` for short-lived access tokens).

push:
- the project's labeling config is the run's vocabulary: one ``BrushLabels`` label per class, with the class's
  colour and ``hint`` thing or stuff; the vocabulary itself rides along in an XML comment of the config, so pull
  maps the labels back to category ids with nothing but the project;
- one task per picked image: ``data`` = {image: a URL the reviewer's browser opens, uri, image_id, why, and which
  version of the image the row is of: ``source_etag``, ``source_size``, ``source_mtime``, ``width``, ``height``,
  where known}; the model's segments are its prediction (pre-annotation), one brush region per segment, in Label
  Studio's brush RLE (:mod:`fcclip.brush`), pixel for pixel the stored COCO RLE;
- images: a local file becomes ``/data/local-files/?d=PATH`` under the server's
  ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` (``--document-root``, default that variable), and the project gets a
  local-files storage for the images' folder so that Label Studio serves them; an ``s3://`` / ``gs://`` object gets
  a presigned URL (``--url-expiry``, 7 days); an ``http(s)://`` URI is used as it is;
- a rerun adds only the images the project does not have yet as they are now: an image with a task of the same
  version (:func:`pipelines.output.same_version`) is not added again; one whose content changed since its task was
  made (relabeled by an incremental ``fcclip label``) gets a new task, with its new masks.

pull: per image its latest task counts (an earlier task of an image pushed again after it changed is *superseded*:
counted, not a row); that task's latest submitted (not skipped) annotation becomes an ``ok`` row of a labeling
output, with the version the task recorded in its source columns (so that ``merge`` never applies it to the image's
later content): the brush regions decoded, painted in the order of the annotation's regions (a later region takes
the pixels it shares with an earlier one), regions of one stuff class merged, COCO RLE, areas and boxes as ``fcclip
label`` writes them, score 1; ``source`` = ``human-reviewed``, ``reviewed_by`` (the annotator's e-mail) and
``reviewed_at`` (when the annotation was last updated, UTC); one submitted without regions is a row without
segments, at the size the task recorded. Tasks without a submitted annotation are pending, and those a reviewer
skipped (every annotation cancelled) are skipped: both listed (uri, image id, task) and counted, in
``REVIEWED/_fcclip/pull.json`` too, not rows. REVIEWED is a Delta table, as a labeling output is: its one part file
is version 0.
"""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import re
import sys
import time
import urllib.parse
from datetime import datetime, timezone
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow as pa

from fcclip import brush

__all__ = ["LabelStudio", "LabelStudioError", "labeling_config", "push", "pull", "TOKEN_ENV"]

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
FROM_NAME, TO_NAME = "label", "image"
_VOCAB_COMMENT = re.compile(r"<!--\s*fcclip\.vocabulary\s+(.*?)\s*-->", re.S)


class LabelStudioError(RuntimeError):
    """Label Studio refused or cannot be reached; one line."""


# ----------------------------------------------------------------------------------------------------- the client
class LabelStudio:
    """A minimal Label Studio REST client (requests). ``token``: a legacy API token or a personal access token."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60):
        try:
            import requests
        except ImportError:
            raise LabelStudioError('push and pull need requests: pip install "fcclip[review]"') from None

        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        if not self.token:
            raise LabelStudioError(f"set {TOKEN_ENV} to a Label Studio API token (Account & Settings)")
        self.session = requests.Session()
        self.timeout = timeout
        self._access: tuple[str, float] | None = None

    def _auth(self) -> str:
        if self.token.count(".") != 2:  # a legacy token
            return f"Token {self.token}"
        if self._access is None or self._access[1] < time.time():  # a personal access token (JWT refresh token)
            r = self.session.post(f"{self.url}/api/token/refresh/", json={"refresh": self.token}, timeout=self.timeout)
            if r.status_code != 200:
                raise LabelStudioError(f"{self.url}: the personal access token was refused ({r.status_code})")
            self._access = (r.json()["access"], time.time() + 240)
        return f"Bearer {self._access[0]}"

    def request(self, method: str, path: str, **kwargs):
        import requests

        try:
            r = self.session.request(method, f"{self.url}{path}", headers={"Authorization": self._auth()},
                                     timeout=self.timeout, **kwargs)
        except requests.RequestException as e:
            raise LabelStudioError(f"cannot reach Label Studio at {self.url}: {type(e).__name__}") from None
        if r.status_code >= 400:
            text = " ".join(r.text.split())[:300]
            raise LabelStudioError(f"{method} {path}: {r.status_code} {text}")
        return r.json() if r.content else None

    def projects(self) -> list[dict]:
        out, page = [], 1
        while True:
            data = self.request("GET", f"/api/projects?page={page}&page_size=100")
            out += data["results"] if isinstance(data, dict) else data
            if not isinstance(data, dict) or not data.get("next"):
                return out
            page += 1

    def project(self, title: str) -> dict | None:
        found = [p for p in self.projects() if p.get("title") == title]
        if len(found) > 1:
            raise LabelStudioError(f"{len(found)} projects are named {title!r}; rename all but one")
        return self.request("GET", f"/api/projects/{found[0]['id']}") if found else None

    def tasks(self, project_id: int) -> list[dict]:
        """Every task of the project with its predictions and annotations, a page at a time."""
        out, page = [], 1
        while True:
            data = self.request("GET", f"/api/tasks?project={project_id}&fields=all&page={page}&page_size=100")
            batch = data.get("tasks", []) if isinstance(data, dict) else data
            out += batch
            if not batch or len(out) >= int(data.get("total", len(out))):
                return out
            page += 1


# ----------------------------------------------------------------------------------------------------- the config
def label_values(vocabulary: dict) -> list[str]:
    """The Label Studio label of each class: its first name, with ``#id`` when another class has the same one."""
    firsts = [c["names"][0] for c in vocabulary["categories"]]
    return [n if firsts.count(n) == 1 else f"{n} #{c['id']}" for n, c in zip(firsts, vocabulary["categories"])]


def labeling_config(vocabulary: dict) -> str:
    """The project's labeling config for a vocabulary (``Vocabulary.to_dict()``), the vocabulary in a comment."""
    from fcclip.vocabulary import Vocabulary

    vocab = Vocabulary.from_dict(vocabulary)
    lines = ["<View>", f'  <Image name="{TO_NAME}" value="$image" zoom="true"/>',
             f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">']
    for value, c in zip(label_values(vocabulary), vocab.categories):
        colour = "#%02x%02x%02x" % tuple(c.color)
        lines.append(f"    <Label value={quoteattr(value)} background={quoteattr(colour)} "
                     f"hint={quoteattr('thing' if c.is_thing else 'stuff')}/>")
    text = json.dumps(vocabulary, sort_keys=True, ensure_ascii=True).replace("--", "-\\u002d")
    lines += ["  </BrushLabels>", f"  <!-- fcclip.vocabulary {text} -->", "</View>"]
    return "\n".join(lines)


def config_vocabulary(config: str) -> dict:
    m = _VOCAB_COMMENT.search(config or "")
    if not m:
        raise LabelStudioError("the project's labeling config was not made by fcclip review push (no vocabulary)")
    return json.loads(m.group(1))


# ------------------------------------------------------------------------------------------------------- push
def _image_url(uri: str, document_root: str | None, expiry: int) -> tuple[str, str | None]:
    """(URL for the browser, local folder that needs a local-files storage or None)."""
    import fsspec

    if uri.startswith(("http://", "https://")):
        return uri, None
    if "://" in uri and not uri.startswith("file://"):
        fs, path = fsspec.core.url_to_fs(uri)
        try:
            return fs.sign(path, expiration=expiry), None
        except NotImplementedError:
            raise LabelStudioError(f"cannot presign {uri}: its filesystem has no signed URLs") from None
    path = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    if not document_root:
        raise LabelStudioError(f"{uri} is a local file: give --document-root (the server's "
                               "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, with local-file serving enabled)")
    root = os.path.abspath(document_root)
    if os.path.commonpath([root, path]) != root:
        raise LabelStudioError(f"{uri} is not under --document-root {root}")
    relative = posixpath.join(*os.path.relpath(path, root).split(os.sep))
    return "/data/local-files/?d=" + urllib.parse.quote(relative), os.path.dirname(path)


def prediction_regions(segments: list[dict], width: int, height: int, values: list[str], index: dict) -> list[dict]:
    """A row's segments as Label Studio brush regions (the stored COCO RLE decoded, re-encoded as brush RLE)."""
    from fcclip.masks import decode_rle

    regions = []
    for s in segments:
        mask = decode_rle(s["rle"])
        regions.append({
            "id": f"seg{s['id']}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "brushlabels",
            "original_width": int(width), "original_height": int(height), "image_rotation": 0,
            "score": float(s["score"]),
            "value": {"format": "rle", "rle": brush.encode(mask), "brushlabels": [values[index[s["category_id"]]]]},
        })
    return regions


def push(picks_path: str, url: str, project: str, *, document_root: str | None = None,
         expiry: int = 7 * 24 * 3600, client: LabelStudio | None = None) -> dict:
    """Create (or extend) the project ``project`` with one task per picked image (module docstring)."""
    from .output import open_output, same_version
    from .review import read_picks

    picks = read_picks(picks_path)
    ls = client or LabelStudio(url)
    config = labeling_config(picks.vocabulary)
    existing = ls.project(project)
    have: dict[str, list[dict]] = {}  # image id -> its tasks' data
    if existing is not None:
        if config_vocabulary(existing.get("label_config", "")) != picks.vocabulary:
            raise LabelStudioError(f"project {project!r} holds another vocabulary; push to a new project")
        for t in ls.tasks(existing["id"]):
            have.setdefault(t["data"].get("image_id"), []).append(t["data"])

    wanted = {r["image_id"]: r for r in picks.table.to_pylist()}
    output = open_output(picks.dest)
    values = label_values(picks.vocabulary)
    index = {int(c["id"]): i for i, c in enumerate(picks.vocabulary["categories"])}
    rows = _picked_rows(output, list(wanted)) if wanted else []
    tasks, folders, already, again = [], set(), 0, 0
    fresh = []  # (row, the project's earlier tasks of its image)
    for r in sorted(rows, key=lambda r: wanted[r["image_id"]]["rank"]):
        earlier = have.get(r["image_id"], [])
        if any(same_version(data, r) for data in earlier):  # the project has this image as it is now
            wanted.pop(r["image_id"])
            already += 1
        else:
            fresh.append((r, earlier))
    stale = _not_as_labeled([r for r, _ in fresh])  # a reviewer would see another picture under the masks, or none
    for r, earlier in fresh:
        pick = wanted.pop(r["image_id"])
        if r["uri"] in stale:
            continue
        again += bool(earlier)  # its content changed since its task was made: a task for the new content
        image, folder = _image_url(r["uri"], document_root, expiry)
        if folder:
            folders.add(folder)
        regions = prediction_regions(r["segments"] or [], r["width"], r["height"], values, index)
        prediction = {"model_version": r["model"] or "fcclip", "result": regions}
        if pick["score"] is not None:  # Label Studio sorts tasks by it (uncertainty picks)
            prediction["score"] = float(pick["score"])
        tasks.append({"data": {"image": image, "uri": r["uri"], "image_id": r["image_id"], "why": pick["why"],
                               **_version(r)},
                      "predictions": [prediction]})
    if existing is None:  # made once every task is: a push refused on the way (--document-root) leaves no project
        existing = ls.request("POST", "/api/projects", json={
            "title": project, "label_config": config,
            "description": f"fcclip review: {picks.table.num_rows} images of {picks.dest} picked by {picks.by}"})
    pid = existing["id"]
    if folders:
        _local_storage(ls, pid, folders, document_root)
    for start in range(0, len(tasks), 50):
        ls.request("POST", f"/api/projects/{pid}/import", json=tasks[start:start + 50])
    return {"project_id": pid, "url": f"{ls.url}/projects/{pid}", "added": len(tasks), "already": already,
            "changed": again, "missing": sorted(wanted), "stale": stale}


def _not_as_labeled(rows: list[dict], threads: int = 16) -> dict[str, str]:
    """{uri: why} for the rows whose image is gone from its store or changed since it was labeled (its metadata
    read, a few at once: a HEAD or a stat each; http(s) URIs are not checked)."""
    from concurrent.futures import ThreadPoolExecutor

    from .output import changed_since_labeled, object_now

    def check(row: dict) -> str | None:
        if row["uri"].startswith(("http://", "https://")):
            return None
        now = object_now(row["uri"])
        return "it is gone" if now is None else changed_since_labeled(row, now)

    if not rows:
        return {}
    with ThreadPoolExecutor(max_workers=min(threads, len(rows))) as pool:
        whys = list(pool.map(check, rows))
    return {r["uri"]: why for r, why in zip(rows, whys) if why}


def _version(row: dict) -> dict:
    """Which version of its image a row is of (:data:`pipelines.output.VERSION_KEYS`, where known), as JSON."""
    from .output import VERSION_KEYS

    out = {k: row.get(k) for k in VERSION_KEYS if row.get(k) is not None}
    if "source_mtime" in out:
        out["source_mtime"] = out["source_mtime"].isoformat()
    return out


def _picked_rows(output, image_ids: list[str]) -> list[dict]:
    """The rows of ``image_ids`` in the output, read file by file on this thread (not as a pyarrow dataset over the
    output's fsspec filesystem, which can abort the process as it exits: see LabelingOutput.read)."""
    import pyarrow.compute as pc

    from .output import SOURCE_COLUMNS, PartFile

    wanted = pa.array(image_ids, pa.string())
    rows: list[dict] = []
    for path in output.files:
        with output.fs.open(path, "rb") as f:
            parquet = PartFile(f)
            columns = ["uri", "image_id", "width", "height", "status", "segments", "model"] + [
                c for c in SOURCE_COLUMNS if c in parquet.schema_arrow.names]  # none in outputs older than them
            for batch in parquet.iter_batches(batch_size=4096, columns=columns, use_threads=False):
                hit = pc.is_in(batch.column("image_id"), value_set=wanted)
                if pc.any(hit).as_py():
                    rows += batch.filter(hit).to_pylist()
    return rows


def _local_storage(ls: LabelStudio, project_id: int, folders: set[str], document_root: str) -> None:
    """A local-files storage over the images' common folder (Label Studio serves only files under one)."""
    folder = os.path.commonpath(sorted(folders))
    if os.path.abspath(folder) == os.path.abspath(document_root):
        raise LabelStudioError(f"the images lie directly in --document-root {document_root}; Label Studio serves "
                               "only files in a subfolder of it")
    storages = ls.request("GET", f"/api/storages/localfiles?project={project_id}") or []
    if any(os.path.commonpath([s["path"], folder]) == os.path.normpath(s["path"]) for s in storages):
        return
    ls.request("POST", "/api/storages/localfiles", json={
        "project": project_id, "path": folder, "title": "fcclip images", "use_blob_urls": False})


# ------------------------------------------------------------------------------------------------------- pull
def annotation_segments(result: list[dict], height: int, width: int, vocabulary: dict) -> tuple[list[dict], list]:
    """An annotation's brush regions -> panoptic segments (module docstring) and the labels it could not map."""
    from pycocotools import mask as mask_util

    values = label_values(vocabulary)
    by_value = {v: i for i, v in enumerate(values)}
    for i, c in enumerate(vocabulary["categories"]):  # any name of a class, for hand-made configs
        for n in c["names"]:
            by_value.setdefault(n, i)
    categories = vocabulary["categories"]
    owner = np.zeros((height, width), np.int32)  # region number + 1 (0: unlabeled)
    classes, unknown = [], []
    for region in result:
        if region.get("type", "").lower() != "brushlabels" or region.get("value", {}).get("format") != "rle":
            continue
        names = region["value"].get("brushlabels") or []
        if not names or names[0] not in by_value:
            unknown.append(names[0] if names else None)
            continue
        h, w = int(region.get("original_height", height)), int(region.get("original_width", width))
        if (h, w) != (height, width):
            raise LabelStudioError(f"a region is {w}x{h}, the image {width}x{height}")
        mask = brush.decode(region["value"]["rle"], height, width)
        classes.append(by_value[names[0]])
        owner[mask] = len(classes)
    segments, stuff = [], {}
    for k, c in enumerate(classes, start=1):
        cat = categories[c]
        if not cat.get("isthing", 1) and c in stuff:
            owner[owner == k] = stuff[c]
            continue
        if not cat.get("isthing", 1):
            stuff[c] = k
        segments.append((k, c))
    out = []
    for new_id, (k, c) in enumerate(((k, c) for k, c in segments if (owner == k).any()), start=1):
        rle = mask_util.encode(np.asfortranarray((owner == k).astype(np.uint8)))
        cat = categories[c]
        out.append({"id": new_id, "label": cat["names"][0], "category_id": int(cat["id"]),
                    "is_thing": bool(cat.get("isthing", 1)), "score": 1.0, "area": int(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "rle": {"size": [height, width], "counts": rle["counts"].decode("ascii")}})
    return out, unknown


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def pull(url: str, project: str, out: str, *, client: LabelStudio | None = None) -> dict:
    """The project's submitted annotations as a labeling output at ``out`` (module docstring); returns the counts
    and the pending and skipped tasks."""
    from fcclip.vocabulary import Vocabulary

    from . import lake
    from .output import REVIEWED_SCHEMA, Destination, new_run_id, part_name, write_part

    ls = client or LabelStudio(url)
    info = ls.project(project)
    if info is None:
        raise LabelStudioError(f"no project named {project!r} at {ls.url}")
    vocabulary = config_vocabulary(info.get("label_config", ""))
    vocab = Vocabulary.from_dict(vocabulary)
    dest = Destination(out)
    review = {"label_studio": ls.url, "project": project, "project_id": info["id"]}
    try:  # a pull of this project stopped before its commit is pulled again; anything else in OUT is refused
        lake.unfinished_parts(dest, "review", review, None)
    except lake.FolderTaken as e:
        raise LabelStudioError(str(e)) from None
    users = {}
    rows, pending, skipped, unknown, superseded = [], [], [], [], []
    latest: dict = {}  # image id -> its latest task (pushed again after its image changed: the new content's)
    for task in sorted(ls.tasks(info["id"]), key=lambda t: t["id"]):
        image = task.get("data", {}).get("image_id") or ("task", task["id"])  # a task not made by push: its own
        if image in latest:
            superseded.append(latest[image])
        latest[image] = task
    for task in sorted(latest.values(), key=lambda t: t["id"]):
        data = task.get("data", {})
        annotations = task.get("annotations") or []
        done = [a for a in annotations if not a.get("was_cancelled")]
        if not done:  # not annotated yet, or skipped by whoever opened it
            (skipped if annotations else pending).append(
                {"uri": data.get("uri"), "image_id": data.get("image_id"), "task": task["id"]})
            continue
        ann = max(done, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a["id"]))
        regions = [r for r in ann.get("result") or [] if r.get("type", "").lower() == "brushlabels"]
        size = next(((int(r["original_height"]), int(r["original_width"])) for r in regions), None)
        if size is None:  # an annotation without regions: take the size from the prediction, or from the task
            size = next(((int(r["original_height"]), int(r["original_width"]))
                         for p in task.get("predictions") or [] for r in p.get("result") or []), None)
        if size is None and data.get("height") and data.get("width"):  # nothing in the image, a reviewer says
            size = (int(data["height"]), int(data["width"]))
        if size is None:
            pending.append({"uri": data.get("uri"), "image_id": data.get("image_id"), "task": task["id"]})
            continue
        segments, bad = annotation_segments(ann.get("result") or [], size[0], size[1], vocabulary)
        unknown += bad
        who = ann.get("completed_by")
        if isinstance(who, dict):
            who = who.get("email") or str(who.get("id"))
        elif who is not None:
            if who not in users:
                try:
                    users[who] = ls.request("GET", f"/api/users/{who}").get("email") or str(who)
                except LabelStudioError:
                    users[who] = str(who)
            who = users[who]
        rows.append({"uri": data.get("uri"), "image_id": data.get("image_id"), "width": size[1], "height": size[0],
                     "status": "ok", "error": None, "segments": segments,
                     "model": next((p.get("model_version") for p in task.get("predictions") or []), None),
                     "vocabulary": f"{vocab.name}@{vocab.digest[:16]}", "run_id": None,
                     "source_etag": data.get("source_etag"), "source_size": data.get("source_size"),
                     "source_mtime": _when(data.get("source_mtime")),
                     "source": "human-reviewed", "reviewed_by": who,
                     "reviewed_at": _when(ann.get("updated_at") or ann.get("created_at"))})
    run_id = new_run_id()
    for r in rows:
        r["run_id"] = run_id
    table = pa.Table.from_pylist(rows, schema=REVIEWED_SCHEMA)
    with lake.WriterLock(dest):  # a Delta table like any labeling output: its one part file is version 0
        for path in lake.unfinished_parts(dest, "review", review, f"pull of project {project!r}"):
            dest.fs.rm(path)
        write_part(dest, 0, table, {"vocabulary": vocabulary, "run_id": run_id, "review": review})
        lake.commit_version(dest, [part_name(0)], info={"run_id": run_id, "operation": "review pull",
                                                         "review": review})
    summary = {"reviewed": len(rows), "pending": pending, "skipped": skipped,
               "unknown_labels": sorted(set(map(str, unknown))),
               "superseded": [{"uri": t.get("data", {}).get("uri"), "image_id": t.get("data", {}).get("image_id"),
                               "task": t["id"]} for t in superseded],
               "run_id": run_id}
    dest.write_bytes("_fcclip/pull.json", json.dumps(summary, indent=1).encode())
    return summary


# -------------------------------------------------------------------------------------------------------- CLI
def add_push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("picks", metavar="PICKS", help="fcclip review pick's --out")
    p.add_argument("--label-studio", required=True, metavar="URL",
                   help="the Label Studio server, e.g. http://localhost:8080 (its API token in $LABEL_STUDIO_API_KEY)")
    p.add_argument("--project", required=True, metavar="NAME", help="created when missing, extended otherwise")
    p.add_argument("--document-root", default=os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"),
                   help="the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, for local images (default: that "
                        "variable here)")
    p.add_argument("--url-expiry", type=int, default=7 * 24 * 3600, metavar="SECONDS",
                   help="lifetime of presigned object-store URLs (default: 7 days)")


def add_pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-studio", required=True, metavar="URL",
                   help="the Label Studio server the picks were pushed to (its API token in $LABEL_STUDIO_API_KEY)")
    p.add_argument("--project", required=True, metavar="NAME", help="its project, as `fcclip review push` named it")
    p.add_argument("--out", required=True, metavar="REVIEWED", help="a new folder: the reviewed labeling output")


def main_args(args: argparse.Namespace) -> int:
    if args.review_command == "push":
        s = push(args.picks, args.label_studio, args.project, document_root=args.document_root,
                 expiry=args.url_expiry)
        print(f"{s['added']} task(s) added to project {args.project!r} ({s['already']} already there): {s['url']}")
        if s["changed"]:
            print(f"{s['changed']} of them for images changed since their earlier task (relabeled); pull takes each "
                  "image's latest task")
        if s["missing"]:
            print(f"{len(s['missing'])} picked image(s) no longer in the labeling output: {', '.join(s['missing'])}",
                  file=sys.stderr)
        if s["stale"]:
            print(f"{len(s['stale'])} picked image(s) not pushed: gone from their store, or changed since they were "
                  "labeled (the next fcclip label run labels a changed one again, and a later pick can pick it):",
                  file=sys.stderr)
            for uri, why in s["stale"].items():
                print(f"  {uri}: {why}", file=sys.stderr)
        return 0
    s = pull(args.label_studio, args.project, args.out)
    print(f"{s['reviewed']} reviewed image(s) written to {args.out}; {len(s['pending'])} pending, "
          f"{len(s['skipped'])} skipped")
    for what in ("pending", "skipped"):
        for p in s[what]:
            print(f"  {what}: task {p['task']}  {p['image_id']}  {p['uri']}")
    if s["superseded"]:
        print(f"{len(s['superseded'])} task(s) of images pushed again after they changed left out (superseded by "
              "the later task): " + ", ".join(str(t["task"]) for t in s["superseded"]))
    if s["unknown_labels"]:
        print(f"labels not in the vocabulary, left out: {', '.join(s['unknown_labels'])}", file=sys.stderr)
    return 0
