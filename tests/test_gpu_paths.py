"""What a GPU expects, checked where it can be on a CPU: the pixel decoder with its deformable attention compiles
into one graph for every input size (``torch.compile(dynamic=True, fullgraph=True)``: no graph break, no recompile
at a new size; traced with the eager backend, which checks the graph without generating code); TF32 is turned on
only for CUDA, by the processes that put a model there. On a GPU (marker ``gpu``): post-processing on CUDA (chunks
planned on the host, one transfer) gives the CPU's panoptic results, and TF32 is on where ``use_tf32`` says."""
import copy
import warnings

import numpy as np
import pytest
import torch

from fcclip.precision import use_tf32

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _features(model, height, width):
    torch.manual_seed(0)
    with torch.inference_mode():
        return model.backbone(torch.randn(1, 3, height, width))


def test_pixel_decoder_compiles_once_for_all_input_sizes(tiny_model, monkeypatch):
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    decoder = copy.deepcopy(tiny_model.sem_seg_head.pixel_decoder)
    compiled = torch.compile(decoder, dynamic=True, fullgraph=True, backend="eager")
    try:
        # The first size's feature heights and widths differ from each other and from the channel counts (40, 80,
        # 160, 320): dynamo gives equal sizes one symbol (and the convolutions fix the channels); every level has
        # more than 20480 / channels positions (a CPU convolution's guard; far below the paper's sizes).
        for height, width in ((288, 352), (320, 416), (416, 320)):
            feats = _features(tiny_model, height, width)
            with torch.inference_mode():
                got = compiled(feats)
                want = decoder(feats)
            torch.testing.assert_close(got.mask_features, want.mask_features, rtol=1e-5, atol=1e-5)
            assert got.mask_features.shape[-2:] == (height // 4, width // 4)
    finally:
        torch._dynamo.reset()


def test_tf32_is_for_cuda_only():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert use_tf32("cpu") is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.gpu
@needs_cuda
def test_tf32_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert use_tf32("cuda") is True
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.gpu
@needs_cuda
def test_postprocessing_on_cuda_gives_the_cpu_results(tiny_model, monkeypatch):
    """The same model on CUDA (strict float32) and on the CPU: the panoptic maps agree on nearly every pixel and
    on the segments (float rounding of the convolutions may move a boundary pixel). Strict means both flags off:
    PyTorch runs CUDA convolutions in TF32 by default (cudnn.allow_tf32), which moved a score by 1.6e-3 on an H200."""
    from fcclip import Predictor
    from fcclip.datasets.synthetic import synthetic_image

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gpu_model = copy.deepcopy(tiny_model).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu = Predictor(tiny_model, "cat; dog; grass [stuff]; sky [stuff]", short_edge=None)
        gpu = Predictor(gpu_model, "cat; dog; grass [stuff]; sky [stuff]", short_edge=None)
    for seed, (h, w) in enumerate(((96, 128), (200, 150))):
        img = synthetic_image(seed, h, w)
        a, b = cpu(img), gpu(img)
        agree = (a.panoptic.segment_map == b.panoptic.segment_map).mean()
        assert agree > 0.99, agree
        assert [s["label"] for s in a.panoptic.segments] == [s["label"] for s in b.panoptic.segments]
        np.testing.assert_allclose(a.instances.scores, b.instances.scores, atol=1e-3)
