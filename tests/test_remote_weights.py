"""Checkpoints from object storage and http(s), downloaded once into the cache; downloads that go wrong (an HTML
page instead of the file, a connection cut short) say why and leave nothing in the cache."""
import functools
import http.server
import threading
import warnings

import pytest
import torch

from fcclip import build_model
from fcclip.checkpoint import CheckpointError, fetch, save_checkpoint


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    return save_checkpoint(tiny_model, path)


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_checkpoint_from_s3(s3_bucket, saved, tiny_model, tmp_path, monkeypatch):
    import boto3

    boto3.client("s3").upload_file(str(saved), s3_bucket, "runs/model_final.pth")
    monkeypatch.setenv("FCCLIP_CACHE", str(tmp_path / "cache"))
    model = build_model("fcclip-tiny", weights=f"s3://{s3_bucket}/runs/model_final.pth", device="cpu")
    assert _equal(model, tiny_model)
    cached = list((tmp_path / "cache" / "weights").rglob("model_final.pth"))
    assert len(cached) == 1 and not list((tmp_path / "cache").rglob("*.part"))
    # a second build reads the cache: the object can be gone
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key="runs/model_final.pth")
    assert _equal(build_model("fcclip-tiny", weights=f"s3://{s3_bucket}/runs/model_final.pth", device="cpu"), tiny_model)


def test_checkpoint_over_http(saved, tiny_model, tmp_path, monkeypatch):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(saved.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("FCCLIP_CACHE", str(tmp_path / "cache"))
        url = f"http://127.0.0.1:{server.server_address[1]}/{saved.name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model("fcclip-tiny", weights=url, device="cpu")
        assert _equal(model, tiny_model)
        with pytest.raises(FileNotFoundError):
            build_model("fcclip-tiny", weights=url.replace(saved.name, "missing.pth"), device="cpu")
    finally:
        server.shutdown()
        server.server_close()


QUOTA_PAGE = (b"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Google Drive - Quota exceeded</title></head>"
              b"<body><p>Too many users have viewed or downloaded this file recently.</p></body></html>")


class _Faulty(http.server.BaseHTTPRequestHandler):
    """Answers as misbehaving file hosts do. /quota.pth: a quota page (text/html); /disguised.pth: an HTML page
    sent as application/octet-stream; /flaky.pth: the checkpoint cut off after half its Content-Length the first
    time, whole the second time."""

    checkpoint = b""
    served = {}

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, content_type: str, length: int | None = None):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        count = self.served[self.path] = self.served.get(self.path, 0) + 1
        if self.path == "/quota.pth":
            self._send(QUOTA_PAGE, "text/html; charset=utf-8")
        elif self.path == "/disguised.pth":
            self._send(b"\n  <html><body>Sign in to continue</body></html>", "application/octet-stream")
        elif self.path == "/flaky.pth" and count == 1:  # the connection closes after half of the bytes
            self._send(self.checkpoint[: len(self.checkpoint) // 2], "application/octet-stream",
                       length=len(self.checkpoint))
        elif self.path == "/flaky.pth":
            self._send(self.checkpoint, "application/octet-stream")
        else:
            self.send_error(404)


@pytest.fixture
def faulty_server(saved):
    handler = type("Handler", (_Faulty,), {"checkpoint": saved.read_bytes(), "served": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _cached(cache):
    """The names of what the weights cache holds: files, and the folders with nothing in them (a failed download
    leaves neither)."""
    if not cache.exists():
        return []
    return sorted(p.name for p in (cache / "weights").rglob("*") if p.is_file() or not any(p.iterdir()))


def test_an_html_page_instead_of_the_weights_is_named(faulty_server, tmp_path, monkeypatch):
    base, _ = faulty_server
    monkeypatch.setenv("FCCLIP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as info:
        build_model("fcclip-tiny", weights=f"{base}/quota.pth", device="cpu")
    message = str(info.value)
    assert f"{base}/quota.pth" in message
    assert "HTML page titled 'Google Drive - Quota exceeded'" in message and "text/html" in message
    assert _cached(tmp_path / "cache") == []  # nothing cached, not even a partial file

    with pytest.raises(CheckpointError, match=r"HTML page starting '<html><body>Sign in to continue"):
        fetch(f"{base}/disguised.pth")
    assert _cached(tmp_path / "cache") == []


def test_a_truncated_download_is_refused_and_not_cached(faulty_server, tiny_model, tmp_path, monkeypatch):
    base, handler = faulty_server
    monkeypatch.setenv("FCCLIP_CACHE", str(tmp_path / "cache"))
    size = len(handler.checkpoint)
    with pytest.raises(CheckpointError) as info:
        build_model("fcclip-tiny", weights=f"{base}/flaky.pth", device="cpu")
    message = str(info.value)
    assert f"{base}/flaky.pth" in message
    assert f"after {size // 2:,} of {size:,} bytes" in message
    assert _cached(tmp_path / "cache") == []
    # the next try downloads the whole file: no half file was kept to be taken for the checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("fcclip-tiny", weights=f"{base}/flaky.pth", device="cpu")
    assert _equal(model, tiny_model)
    assert handler.served["/flaky.pth"] == 2 and _cached(tmp_path / "cache") == ["flaky.pth"]
