"""Checkpoints from object storage and http(s), downloaded once into the cache."""
import functools
import http.server
import threading
import warnings

import pytest
import torch

from fcclip import build_model
from fcclip.checkpoint import save_checkpoint


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
