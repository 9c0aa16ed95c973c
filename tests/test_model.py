"""Model behaviour on tiny configs: ConvNeXt and ResNet CLIPs, text tower, out-of-vocabulary pooling, training hooks."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from fcclip import build_model
from fcclip.config import ClipConfig, ModelConfig, load_config
from fcclip.ensemble import classification_logits, geometric_ensemble
from fcclip.model import build_fcclip
from fcclip.random_weights import fill_
from fcclip.text import TextClassifierCache, build_text_classifier, tokenize

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


@pytest.fixture(scope="module")
def tiny_resnet():
    tiny = load_config("fcclip-tiny")
    clip = ClipConfig(
        model_name="tiny-resnet",
        model_cfg={
            "embed_dim": 64,
            "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
            "text_cfg": TEXT_CFG,
        },
    )
    cfg = ModelConfig(
        name="tiny-resnet", clip=clip, head=tiny.head,
        inference=type(tiny.inference)(ensemble_on_valid_mask=True, short_edge=128, max_size=256),
    )
    m = build_fcclip(cfg).eval()
    fill_(m)
    return m


def test_channels_are_read_from_the_model(tiny_model, tiny_resnet):
    assert tiny_model.backbone.kind == "convnext"
    assert tiny_model.backbone.channels == {"res2": 40, "res3": 80, "res4": 160, "res5": 320}  # convnext_atto
    assert tiny_resnet.backbone.kind == "resnet"
    assert tiny_resnet.backbone.channels == {"res2": 64, "res3": 128, "res4": 256, "res5": 512}


@pytest.mark.parametrize("which", ["tiny_model", "tiny_resnet"])
def test_feature_strides(request, which):
    model = request.getfixturevalue(which)
    x = torch.randn(2, 3, 96, 128)
    feats = model.backbone(x)
    for name, stride in (("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)):
        assert feats[name].shape[-2:] == (96 // stride, 128 // stride)
    assert feats["clip_vis_dense"].shape[-2:] == (3, 4)


def test_truncated_text_encoding_equals_full_context(tiny_model):
    """encode_text cuts the sequence after the last end token; open_clip's own encoder runs all 77 positions."""
    tokens = tokenize(["a photo of a cat.", "There is a large traffic cone in the scene.", "x"], 77)
    ours = tiny_model.backbone.encode_text(tokens)
    with torch.no_grad():
        full = tiny_model.backbone.clip_model.encode_text(tokens)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)


def test_resnet_masked_attention_pool_matches_multihead_attention(tiny_resnet):
    """Our attention-pool with per-mask attention equals torch's multi-head attention with the same boolean mask."""
    torch.manual_seed(0)
    pool = tiny_resnet.backbone.clip_model.visual.attnpool
    b, c, h, w, q = 2, 512, 3, 4, 5
    x = torch.randn(b, c, h, w)
    masks = torch.randn(b, q, h, w)
    masks[0, 0] = -1.0  # empty mask: attends everywhere instead of producing NaN
    ours = tiny_resnet.backbone.pooled_embeddings(x, masks)
    assert torch.isfinite(ours).all()

    pos = pool.positional_embedding
    side = int(math.isqrt(pos.shape[0] - 1))
    spatial = F.interpolate(pos[1:].T.reshape(1, c, side, side), size=(h, w), mode="bilinear", align_corners=False)
    spatial = spatial.permute(2, 3, 0, 1).reshape(h * w, 1, c)
    tokens = x.reshape(b, c, h * w).permute(2, 0, 1)
    query = (tokens.mean(0, keepdim=True) + pos[:1, None, :]).repeat_interleave(q, dim=0)
    blocked = (masks > 0).reshape(b, q, h * w) < 0.5
    blocked[0, 0] = False
    blocked = blocked.unsqueeze(1).expand(-1, pool.num_heads, -1, -1).reshape(b * pool.num_heads, q, h * w)
    with torch.no_grad():
        expected = F.multi_head_attention_forward(
            query=query, key=tokens + spatial, value=tokens + spatial, embed_dim_to_check=c,
            num_heads=pool.num_heads, q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False, attn_mask=blocked,
        )[0].permute(1, 0, 2)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_resnet_model_runs_with_valid_mask_ensemble(tiny_resnet):
    text = build_text_classifier(tiny_resnet.backbone, "cat; dog; grass [stuff]", cache=TextClassifierCache(enabled=False))
    x = tiny_resnet.normalize(torch.rand(1, 3, 64, 96) * 255)
    out = tiny_resnet.inference(x, text)
    assert out.class_logits.shape == (1, 20, 4)
    probs = out.class_logits.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 20), atol=1e-4, rtol=0)


def test_valid_mask_switches_the_clip_classifier_off():
    torch.manual_seed(0)
    in_logits, out_logits = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    seen = torch.tensor([True, False, True, False])
    valid = torch.tensor([[True, False, True]])
    ens = geometric_ensemble(in_logits, out_logits, seen, 0.4, 0.8, valid=valid)
    in_only = geometric_ensemble(in_logits, out_logits, seen, 0.0, 0.0)
    torch.testing.assert_close(ens.probs[0, 1], in_only.probs[0, 1])
    assert not torch.allclose(ens.probs[0, 0], in_only.probs[0, 0])


def test_classification_logits_take_the_max_over_synonyms():
    classifier = F.normalize(torch.eye(4), dim=-1)  # 3 synonym rows + void
    synonym_class = torch.tensor([0, 0, 1])
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    logits = classification_logits(x, classifier, torch.tensor(math.log(100.0)), synonym_class, 2)
    expected = torch.tensor([[[100.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 100.0, 0.0]]])
    torch.testing.assert_close(logits, expected)


def test_ensemble_weights_by_seen_class():
    p_in = torch.tensor([0.5, 0.3, 0.2])
    p_out = torch.tensor([0.2, 0.2, 0.6])
    logit = lambda p: torch.cat([p.log(), torch.tensor([-1e9])])  # noqa: E731  no void
    ens = geometric_ensemble(logit(p_in)[None, None], logit(p_out)[None, None], torch.tensor([True, False, True]), 0.4, 0.8)
    w = torch.tensor([0.4, 0.8, 0.4])
    expected = (p_in ** (1 - w) * p_out**w)
    expected = expected / expected.sum()
    torch.testing.assert_close(ens.probs[0, 0, :3], expected, atol=1e-6, rtol=1e-5)
    assert ens.probs[0, 0, 3].item() == pytest.approx(0.0, abs=1e-6)


def test_only_the_head_trains(tiny_model):
    text = build_text_classifier(tiny_model.backbone, "cat; dog", cache=TextClassifierCache(enabled=False))
    model = tiny_model
    model.train()
    try:
        out = model(model.normalize(torch.rand(1, 3, 64, 64) * 255), text)
        loss = out.class_logits.logsumexp(-1).mean() + out.mask_logits.sigmoid().mean()
        loss = loss + sum(c.mean() + m.mean() for c, m in out.aux)
        loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        assert not model.backbone.training  # frozen CLIP stays in eval mode
        head = dict(model.sem_seg_head.named_parameters())
        assert head["predictor.query_feat.weight"].grad is not None
        assert head["pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].grad is not None
        assert model.void_embedding.weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_text_classifier_cache(tiny_model, tmp_path, monkeypatch):
    cache = TextClassifierCache(tmp_path)
    first = build_text_classifier(tiny_model.backbone, "cat; dog, puppy", cache=cache)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    import fcclip.text as text_mod

    def fail(*a, **k):
        raise AssertionError("encoded again instead of using the cache")

    monkeypatch.setattr(text_mod, "encode_vocabulary", fail)
    second = build_text_classifier(tiny_model.backbone, "cat; dog, puppy", cache=TextClassifierCache(tmp_path))
    torch.testing.assert_close(first.embeddings, second.embeddings)
    assert first.synonym_class.tolist() == [0, 1, 1]


def test_deterministic_random_weights_follow_the_fixture_rule(tiny_model):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    from deterministic_fill import value_for

    for key, p in list(tiny_model.named_parameters())[::37]:
        torch.testing.assert_close(p.detach(), value_for(key, p.shape))


# --------------------------------------------------------------------------------------------- speed paths
def _deform_inputs(seed: int, batch: int = 2, heads: int = 2, channels: int = 4, points: int = 3):
    from fcclip.deform_attn import multi_scale_deformable_attention  # noqa: F401  (import checked here)

    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (6, 10), (1, 1)]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(batch, s, heads, channels, generator=g)
    # locations beyond [0, 1] on purpose: neighbours outside the map read zero
    loc = torch.rand(batch, 7, heads, len(shapes), points, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(batch, 7, heads, len(shapes), points, generator=g)
    return value, shapes, loc, weights / weights.sum((-1, -2), keepdim=True)


@pytest.mark.parametrize("seed", range(3))
def test_deformable_attention_gather_equals_grid_sample(seed):
    from fcclip.deform_attn import multi_scale_deformable_attention, multi_scale_deformable_attention_grid_sample

    value, shapes, loc, weights = _deform_inputs(seed)
    ours = multi_scale_deformable_attention(value, shapes, loc, weights)
    spec = multi_scale_deformable_attention_grid_sample(value, shapes, loc, weights)
    assert ours.shape == spec.shape == (2, 7, 2 * 4)
    torch.testing.assert_close(ours, spec, atol=1e-5, rtol=1e-5)


def test_deformable_attention_reads_pixel_centres_exactly_and_zero_outside():
    from fcclip.deform_attn import multi_scale_deformable_attention

    h, w = 2, 3
    value = torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1, 1)
    # the centre of pixel (row 1, col 2), a point between columns 0 and 1 of row 0, and a point outside the map
    loc = torch.tensor([[2.5 / w, 1.5 / h], [1.0 / w, 0.5 / h], [-1.0, 0.5]]).view(1, 3, 1, 1, 1, 2)
    out = multi_scale_deformable_attention(value, [(h, w)], loc, torch.ones(1, 3, 1, 1, 1))
    torch.testing.assert_close(out.flatten(), torch.tensor([5.0, 0.5, 0.0]))


def test_deformable_attention_gradients_equal_grid_sample():
    from fcclip.deform_attn import multi_scale_deformable_attention, multi_scale_deformable_attention_grid_sample

    grads = []
    for fn in (multi_scale_deformable_attention, multi_scale_deformable_attention_grid_sample):
        value, shapes, loc, weights = _deform_inputs(5)
        for t in (value, loc, weights):
            t.requires_grad_(True)
        out = fn(value, shapes, loc, weights)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((value.grad, loc.grad, weights.grad))
    for ours, spec in zip(*grads):
        torch.testing.assert_close(ours, spec, atol=1e-4, rtol=1e-4)


def test_inference_skips_the_aux_heads_with_the_same_result(tiny_model):
    """Inference computes the earlier heads' attention masks from resized mask features (no stride-4 masks, no
    class heads): the final outputs equal those of the full forward."""
    text = build_text_classifier(tiny_model.backbone, "cat; dog; grass [stuff]", cache=TextClassifierCache(enabled=False))
    x = tiny_model.normalize(torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 255)
    with torch.inference_mode():
        full = tiny_model(x, text)
        fast = tiny_model.inference(x, text)
    assert len(full.aux) == tiny_model.sem_seg_head.predictor.num_layers and fast.raw.aux == []
    torch.testing.assert_close(fast.raw.class_logits, full.class_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.raw.mask_logits, full.mask_logits, atol=1e-3, rtol=1e-4)


def test_channels_last_backbone_gives_the_same_features(tiny_model):
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    backbone = tiny_model.backbone
    assert not backbone.channels_last  # the default
    try:
        with torch.inference_mode():
            nchw = backbone(x)
            backbone.use_channels_last(True)
            nhwc = backbone(x)
    finally:
        backbone.use_channels_last(False)
    assert nhwc["res2"].is_contiguous(memory_format=torch.channels_last)
    for name in nchw:
        torch.testing.assert_close(nhwc[name], nchw[name], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_model_matches_eager():
    """build_model(compile=True): torch.compile'd backbone and decoders give the eager model's outputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = build_model("fcclip-tiny", weights="random", device="cpu")
        compiled = build_model("fcclip-tiny", weights="random", device="cpu", compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # compiling in place keeps the keys
    text = build_text_classifier(eager.backbone, "cat; dog; grass [stuff]", cache=TextClassifierCache(enabled=False))
    x = eager.normalize(torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 255)
    with torch.inference_mode():
        want = eager.inference(x, text)
        got = compiled.inference(x, text)
    torch.testing.assert_close(got.class_logits, want.class_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.mask_logits, want.mask_logits, atol=1e-3, rtol=1e-4)
