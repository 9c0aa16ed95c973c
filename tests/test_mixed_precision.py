"""Mixed precision as the reference does it, checked on a CPU under ``torch.autocast("cpu", torch.bfloat16)``: the
pixel decoder and its deformable attention compute in float32 (their layers' outputs, the sampling step's inputs),
and give the float32 run's outputs within the parity fixture's tolerances; the class logits and the ensemble are
float32; the rest of the model does run in bf16. A CUDA device without native bf16 (a stand-in capability) is
refused in one line: emulation does not count. The same checks run under CUDA autocast on a GPU (marker ``gpu``)."""
import copy

import warnings

import pytest
import torch
from torch import nn

import fcclip.deform_attn as deform_attn
import fcclip.precision as precision
from fcclip.deform_attn import MSDeformAttn
from fcclip.ensemble import classification_logits, geometric_ensemble
from fcclip.text import TextClassifierCache, build_text_classifier
from test_parity import TOL  # the parity fixture's tolerances, read from its README

BF16 = torch.bfloat16
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.fixture(scope="module", params=DEVICES)
def model(request, tiny_model):
    """The tiny model on each device (a copy on CUDA: the session's model stays on the CPU)."""
    return tiny_model if request.param == "cpu" else copy.deepcopy(tiny_model).to(request.param)


def _within(name, ours, ref):
    atol, rtol = TOL[name]
    excess = (ours.float() - ref.float()).abs() - (atol + rtol * ref.float().abs())
    assert excess.max().item() <= 0, f"{name}: off by up to {excess.max().item():.3g} beyond the tolerance"


@pytest.fixture(scope="module")
def features(model):
    """The tiny backbone's features of a 256 x 352 input under bf16 autocast, in bf16 (a backbone whose stages end
    in a bf16 op gives them so)."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 256, 352).to(model.device)
    with torch.inference_mode(), torch.autocast(model.device.type, dtype=BF16):
        feats = model.backbone(images)
    return {k: v.to(BF16) for k, v in feats.items()}


def test_pixel_decoder_computes_in_float32_under_autocast(model, features, monkeypatch):
    decoder = model.sem_seg_head.pixel_decoder
    device_type = model.device.type
    layer_dtypes, sampling = {}, []

    def record(module, args, output):
        layer_dtypes[module] = output.dtype

    hooks = [m.register_forward_hook(record) for m in decoder.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm))]
    gather = deform_attn._gather_attention

    def recording_gather(value, shapes, locations, weights):
        sampling.append((value.dtype, locations.dtype, weights.dtype, torch.is_autocast_enabled(device_type)))
        return gather(value, shapes, locations, weights)

    monkeypatch.setattr(deform_attn, "_gather_attention", recording_gather)
    try:
        with torch.inference_mode(), torch.autocast(device_type, dtype=BF16):
            mixed = decoder(features)
    finally:
        for h in hooks:
            h.remove()
    assert len(layer_dtypes) > 20 and set(layer_dtypes.values()) == {torch.float32}
    assert len(sampling) == 2  # the tiny encoder's two layers
    assert set(sampling) == {(torch.float32, torch.float32, torch.float32, False)}

    with torch.inference_mode():  # the same (bf16-rounded) features without autocast
        plain = decoder({k: v.float() for k, v in features.items()})
    assert mixed.mask_features.dtype == torch.float32
    _within("pixel_decoder_mask_features", mixed.mask_features, plain.mask_features)
    for i in range(3):
        assert mixed.multi_scale[i].dtype == torch.float32
        _within(f"pixel_decoder_multi_scale_{i}", mixed.multi_scale[i], plain.multi_scale[i])


@pytest.mark.parametrize("device", DEVICES)
def test_deformable_attention_keeps_sub_pixel_positions_under_autocast(device):
    """A level 400 px wide: in bf16 a position beyond 128 px is a whole pixel (the sample loses its fraction); in
    float32 under autocast the output is the float32 run's."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=1, n_heads=2, n_points=2)
    nn.init.normal_(attn.sampling_offsets.weight, std=0.5)  # offsets of a fraction of a pixel, not only the rings
    nn.init.normal_(attn.attention_weights.weight, std=0.5)
    shapes = [(4, 400)]
    value = torch.randn(1, 4 * 400, 32)
    query = torch.randn(1, 64, 32)
    reference = torch.rand(1, 64, 1, 2) * torch.tensor([0.6, 1.0]) + torch.tensor([0.4, 0.0])  # x beyond 160 px
    attn, value, query, reference = (t.to(device) for t in (attn, value, query, reference))
    with torch.no_grad():
        plain = attn(query, reference, value, shapes)
        with torch.autocast(torch.device(device).type, dtype=BF16):
            mixed = attn(query.to(BF16), reference, value.to(BF16), shapes)
        rounded = attn(query.to(BF16).float(), reference, value.to(BF16).float(), shapes)
        # the sampling positions rounded to bf16 (what the sampling step did when it ran in the values' dtype)
        locations = reference[:, :, None, :, None, :] + attn.sampling_offsets(query).view(1, 64, 2, 1, 2, 2) / 400
        weights = attn.attention_weights(query).view(1, 64, 2, 2).softmax(-1).view(1, 64, 2, 1, 2)
        values = attn.value_proj(value).view(1, -1, 2, 16)
        exact = deform_attn.multi_scale_deformable_attention(values, shapes, locations, weights)
        coarse = deform_attn.multi_scale_deformable_attention(values, shapes, locations.to(BF16), weights)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, rounded, atol=1e-6, rtol=1e-6)  # the bf16 inputs, computed in float32
    assert (mixed - plain).abs().max() < 0.05
    assert (coarse - exact).abs().max() > 0.2  # a sample a fraction of a pixel off reads other values


def test_class_logits_and_ensemble_are_float32_under_autocast(model):
    device = model.device
    text = build_text_classifier(model.backbone, "cat; dog; grass [stuff]", cache=TextClassifierCache(enabled=False))
    torch.manual_seed(0)
    images = torch.randn(1, 3, 128, 160).to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=BF16):
        out = model.inference(images, text)
    assert out.raw.mask_logits.dtype == BF16  # the transformer decoder runs in bf16
    assert out.raw.class_logits.dtype == torch.float32  # its class logits do not
    for t in (out.class_logits, out.out_vocab_logits, out.ensemble.probs, out.ensemble.in_vocab_probs):
        assert t.dtype == torch.float32

    # bf16 embeddings give the float32 logits of those same embeddings, not bf16-rounded ones
    emb = torch.randn(2, 5, 64).to(device, BF16)
    classifier = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1).to(device)
    synonym_class = torch.tensor([0, 1, 1])
    scale = torch.tensor(4.6052).to(device)
    with torch.autocast(device.type, dtype=BF16):
        mixed = classification_logits(emb, classifier, scale, synonym_class, 2)
        ens = geometric_ensemble(mixed, mixed.flip(-1), torch.tensor([True, False]), 0.4, 0.8)
    exact = classification_logits(emb.float(), classifier, scale, synonym_class, 2)
    assert mixed.dtype == ens.probs.dtype == ens.log_probs.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, atol=1e-5, rtol=1e-6)
    assert (exact.to(BF16).float() - exact).abs().max() > 0.02  # what bf16 logits of 10-25 would have lost


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)],
                         ids=["V100", "T4", "A100", "H100"])
def test_emulated_cuda_bf16_is_refused_in_one_line(monkeypatch, fresh_warnings, capability, native):
    """A stand-in device capability; torch's own query would count emulation (V100 and T4 "support" bf16)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = precision.resolve_autocast_dtype(BF16, "cuda")
        fp16 = precision.resolve_autocast_dtype(torch.float16, "cuda")
    assert fp16 is torch.float16  # float16 is native on every CUDA GPU
    if native:
        assert got is BF16 and not record
    else:
        assert got is None
        assert len(record) == 1 and "\n" not in str(record[0].message)
        assert "no native bfloat16" in str(record[0].message) and "float32" in str(record[0].message)
