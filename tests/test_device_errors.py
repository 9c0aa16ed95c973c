"""A sticky CUDA error (a device-side assert: the process's CUDA context is dead) ends the model actor, so that the
labeling engine replaces it (pipelines/engine.py, `RayActorError`), instead of running every later image in the dead
context and writing a stream of error rows. Out of memory is not one: the batch is run again image by image. The
errors are torch's own exception types, raised by stand-in model stages."""
import numpy as np
import pytest
import torch

from fcclip_pipelines.stages import DeviceLost, device_lost, label_images


class _Stage:
    """A model stage that raises `error` on batches of more than `fail_above` images (every batch: 0)."""

    model_id = "stand-in"

    def __init__(self, error: BaseException, fail_above: int = 0):
        self.error, self.fail_above, self.calls = error, fail_above, 0

    def __call__(self, images, sizes):
        self.calls += 1
        if len(images) > self.fail_above:
            raise self.error
        return [(np.ones(size, dtype=np.int32), [{"id": 1, "label": "x", "category_id": 1, "is_thing": True,
                                                  "score": 0.9}]) for size in sizes]


def _chunk(n=4):
    meta = {"height": [8] * n, "width": [10] * n, "error": [None] * n}
    return meta, [np.zeros((8, 10, 3), np.uint8)] * n


ASSERT = "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions."


@pytest.mark.parametrize("error", [torch.AcceleratorError(ASSERT), RuntimeError(ASSERT),
                                   RuntimeError("CUDA error: an illegal memory access was encountered")],
                         ids=["AcceleratorError", "RuntimeError", "illegal-address"])
def test_a_sticky_cuda_error_raises_device_lost_at_once(error):
    stage = _Stage(error)
    meta, images = _chunk()
    with pytest.raises(DeviceLost, match="device-side assert|illegal memory access"):
        label_images(stage, meta, images, batch_size=2)
    assert stage.calls == 1  # not retried image by image in the dead context


def test_out_of_memory_is_retried_image_by_image():
    stage = _Stage(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), fail_above=1)
    assert not device_lost(stage.error)
    meta, images = _chunk()
    out = label_images(stage, meta, images, batch_size=4)
    assert out["error"] == [None] * 4 and all(m is not None for m in out["maps"])
    assert stage.calls == 1 + 4
    # another error is an error row, as before
    out = label_images(_Stage(ValueError("bad image")), *_chunk(2), batch_size=2)
    assert out["error"] == ["model failed: ValueError: bad image"] * 2


class _LostDevice:
    model_id = "stand-in"

    def __call__(self, images, sizes):
        raise torch.AcceleratorError(ASSERT)


def _lost_device():
    return _LostDevice()


def _label(segmenter, meta, images):
    return label_images(segmenter, meta, images, 2)


@pytest.mark.ray
def test_the_model_actor_ends_on_a_lost_device(ray_local):
    import sys

    from ray import cloudpickle

    from fcclip_pipelines.runtime import start_model_actor

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    actor = start_model_actor(_lost_device, gpus=0, cpus=0.5)
    assert ray_local.get(actor.ready.remote()) == "stand-in"
    meta, images = _chunk(2)
    info, result = actor.run.options(num_returns=2).remote(_label, meta, images)
    with pytest.raises(ray_local.exceptions.RayActorError):  # the engine replaces an actor that died
        ray_local.get(info, timeout=60)


class _Recording(_Stage):
    """Records the (h, w) of the images of each batch."""

    def __init__(self):
        super().__init__(RuntimeError("unused"), fail_above=10**9)
        self.batches = []

    def __call__(self, images, sizes):
        self.batches.append([im.shape[:2] for im in images])
        return super().__call__(images, sizes)


def test_batches_group_images_by_aspect_ratio():
    """Portrait and landscape images alternate in the chunk; each batch holds one orientation, so padding to the
    batch's largest height and width adds nothing, and every row still gets its own image's result."""
    shapes = [(96, 64), (64, 96), (96, 64), (64, 96), (96, 64), (64, 96)]
    images = [np.zeros((h, w, 3), np.uint8) for h, w in shapes]
    meta = {"height": [h for h, _ in shapes], "width": [w for _, w in shapes], "error": [None] * 6}
    stage = _Recording()
    out = label_images(stage, meta, images, batch_size=3)
    assert [set(b) for b in stage.batches] == [{(64, 96)}, {(96, 64)}]
    assert [m.shape for m in out["maps"]] == shapes
