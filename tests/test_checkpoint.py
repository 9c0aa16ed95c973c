"""Checkpoints: the official layout round-trips, safetensors too, and anything that does not fit is refused by name."""
import warnings

import pytest
import torch

from fcclip import build_model
from fcclip.checkpoint import CheckpointError, official_state_dict, read_state_dict, save_checkpoint


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def trained_like(tiny_model):
    # a model whose weights differ from the deterministic random ones
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = build_model("fcclip-tiny", weights="random", device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip(tmp_path, trained_like, suffix):
    path = save_checkpoint(trained_like, tmp_path / f"model_final{suffix}")
    loaded = build_model("fcclip-tiny", weights=str(path), device="cpu")
    _same_weights(trained_like, loaded)
    assert loaded.weights_id.startswith("sha256:")


def test_official_layout(tmp_path, trained_like):
    path = save_checkpoint(trained_like, tmp_path / "model.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model"}
    assert raw["model"]["criterion.empty_weight"].shape == (134,)
    assert raw["model"]["criterion.empty_weight"][-1].item() == pytest.approx(0.1)
    # a bare state dict (no {"model": ...} wrapper) loads too
    torch.save(official_state_dict(trained_like), tmp_path / "bare.pth")
    _same_weights(trained_like, build_model("fcclip-tiny", weights=str(tmp_path / "bare.pth"), device="cpu"))


def test_file_uri(tmp_path, trained_like):
    path = save_checkpoint(trained_like, tmp_path / "m.pth")
    _same_weights(trained_like, build_model("fcclip-tiny", weights=f"file://{path}", device="cpu"))


def _save(tmp_path, state):
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    return str(path)


def test_missing_key_is_named(tmp_path, trained_like):
    state = official_state_dict(trained_like)
    del state["sem_seg_head.predictor.query_feat.weight"]
    with pytest.raises(CheckpointError, match=r"missing: sem_seg_head\.predictor\.query_feat\.weight"):
        build_model("fcclip-tiny", weights=_save(tmp_path, state), device="cpu")


def test_leftover_key_is_named(tmp_path, trained_like):
    state = official_state_dict(trained_like)
    state["sem_seg_head.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected: sem_seg_head\.extra\.weight"):
        build_model("fcclip-tiny", weights=_save(tmp_path, state), device="cpu")


def test_wrong_shape_is_named(tmp_path, trained_like):
    state = official_state_dict(trained_like)
    state["void_embedding.weight"] = torch.zeros(1, 7)
    with pytest.raises(CheckpointError, match=r"wrong shape: void_embedding\.weight: checkpoint \(1, 7\)"):
        build_model("fcclip-tiny", weights=_save(tmp_path, state), device="cpu")


class Payload:
    def __reduce__(self):  # what a malicious checkpoint would do when unpickled
        return (print, ("unpickled!",))


def test_arbitrary_objects_are_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"model": {"w": torch.zeros(1)}, "x": Payload()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.pth")


def test_preset_without_release_needs_weights():
    from fcclip.config import ConfigError

    with pytest.raises(ConfigError, match="preset has no checkpoint to download"):
        build_model("fcclip-tiny", weights="official", device="cpu")


def test_checkpoints_and_part_files_get_the_umasks_permissions(tmp_path, trained_like):
    """Written through a temporary file renamed into place, as a plain file would be: 0o666 less the umask (other
    users of a shared storage, a reader service, can read them), not the temporary file's 0o600."""
    import os
    import stat

    from fcclip_pipelines.output import Destination

    previous = os.umask(0o022)
    try:
        save_checkpoint(trained_like, tmp_path / "model.pth")
        Destination(str(tmp_path / "out")).write_bytes("part-000000.parquet", b"rows")
    finally:
        os.umask(previous)
    for path in (tmp_path / "model.pth", tmp_path / "out" / "part-000000.parquet"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
