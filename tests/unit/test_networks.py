"""The networks' shapes for every backbone MONAI provides here (random weights, no download)."""

import numpy as np
import pytest
import torch

from models.lightning import one_hot_masks
from models.networks import BACKBONES, SEG_NORMS, equalise, make_classifier, make_segmenter


@pytest.mark.parametrize("backbone", BACKBONES)
def test_asc_builds_and_runs_on_each_backbone(backbone):
    torch.manual_seed(0)
    net = make_classifier("asc-ga", 16, backbone, backbone).eval()
    image = torch.rand(2, 1, 64, 64)
    masks = one_hot_masks(torch.randint(0, 3, (2, 64, 64)))
    with torch.no_grad():
        out = net(image, masks, torch.zeros(2, 2))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_image_only_has_no_shape_branch_and_unknown_backbones_fail():
    net = make_classifier("image-only", 16, "resnet18")
    assert not hasattr(net, "shape")
    with pytest.raises(ValueError, match="unknown backbone"):
        make_classifier("asc", 16, "inception")


def test_segmenter_gives_three_classes_at_input_size():
    seg = make_segmenter((8, 16, 32)).eval()
    with torch.no_grad():
        assert seg(torch.rand(1, 1, 48, 48)).shape == (1, 3, 48, 48)


def test_an_instance_normalised_segmenter_sees_each_image_alone():
    """With `segment.norm: instance` an image's output does not depend on the other images of
    its batch, in training as in inference: no statistics of other images, or of the training
    scanners, enter it. A batch-normalised segmenter in training mode mixes them (the control)."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 32, 32)
    x[1:] = x[1:] * 3.0 + 0.5                     # the other images brighter and more contrasted
    for norm, alone in (("instance", True), ("batch", False)):
        seg = make_segmenter((8, 16, 32), norm).train()
        with torch.no_grad():
            same = torch.allclose(seg(x[:1]), seg(x)[:1], atol=1e-5)
        assert same is alone, norm
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in make_segmenter((8, 16, 32), "instance").modules())
    with pytest.raises(ValueError, match="choose one of"):
        make_segmenter((8, 16, 32), "group")


def test_a_saved_model_keeps_its_segmenter_norm_and_older_models_load_as_batch(tmp_path):
    import json

    from pipelines.serving.inference import ModelConfig, Predictor

    torch.manual_seed(0)
    cfg = ModelConfig("asc", 16, (8, 16, 32), 48, 1.15, 0.5, seg_norm="instance")
    seg = make_segmenter(cfg.seg_channels, "instance").eval()
    Predictor(seg, make_classifier("asc", 16), cfg).save(tmp_path)
    loaded = Predictor.load(tmp_path)
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded.seg.eval()(x), seg(x))
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["seg_norm"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(RuntimeError):             # batch-norm buffers missing from the weights
        Predictor.load(tmp_path)
    Predictor(make_segmenter(cfg.seg_channels), make_classifier("asc", 16),
              ModelConfig(**{**raw, "seg_channels": (8, 16, 32)})).save(tmp_path)
    old = Predictor.load(tmp_path)
    assert old.cfg.seg_norm == "batch"
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in old.seg.modules())


def test_asc_scale_sees_the_scale_and_never_the_ga():
    """asc-scale reads the crop's physical scale (context column 1), not GA (column 0): changing
    GA changes nothing, changing the scale changes the logits; asc-ga reads both."""
    torch.manual_seed(0)
    image = torch.rand(3, 1, 48, 48)
    masks = one_hot_masks(torch.randint(0, 3, (3, 48, 48)))
    ctx = torch.randn(3, 2)
    other_ga, other_scale = ctx.clone(), ctx.clone()
    other_ga[:, 0] += 2.0
    other_scale[:, 1] += 2.0
    for model, reads_ga in (("asc-scale", False), ("asc-ga", True)):
        net = make_classifier(model, 16).eval()
        with torch.no_grad():
            base, ga, scale = (net(image, masks, c) for c in (ctx, other_ga, other_scale))
        assert torch.allclose(base, ga) != reads_ga, model
        assert not torch.allclose(base, scale), model


def test_asc_z_reads_the_measured_z_score():
    """asc-z reads a third context column (the TCD z-score); asc-ga, given the same three
    columns, ignores it."""
    torch.manual_seed(0)
    image = torch.rand(3, 1, 48, 48)
    masks = one_hot_masks(torch.randint(0, 3, (3, 48, 48)))
    ctx = torch.randn(3, 3)
    other_z = ctx.clone()
    other_z[:, 2] += 2.0
    for model, reads_z in (("asc-z", True), ("asc-ga", False)):
        net = make_classifier(model, 16).eval()
        with torch.no_grad():
            assert torch.allclose(net(image, masks, ctx), net(image, masks, other_z)) != reads_z, model


def test_tcd_z_column_is_the_rules_measurement():
    """with_tcd_z appends the z-score the biometry rule scores (clipped, scaled), from the very
    masks given, and 0 where there is no cerebellum; the rule's probability is 0.5 at the 5th
    centile's z."""
    from scipy.special import ndtr

    from pipelines import biometry
    from pipelines.serving.inference import context_features, measured_tcd_z, rule_probability, with_tcd_z

    labels = np.zeros((3, 64, 64), np.uint8)
    labels[0, 28:36, 12:52] = 1            # a cerebellum 40 px wide
    labels[1, 28:36, 22:42] = 1            # one 20 px wide
    ctx = context_features(np.array([24.0, 24.0, 24.0]), np.array([0.5, 0.5, 0.5]))
    z = measured_tcd_z(labels, ctx)
    expected = biometry.tcd_zscore([biometry.measure_mask(m, 0.5)[0] for m in labels[:2]], [24.0, 24.0])
    np.testing.assert_allclose(z[:2], expected)
    assert np.isnan(z[2]) and z[1] < z[0]
    out = with_tcd_z(labels, ctx)
    np.testing.assert_allclose(out[:, :2], ctx)
    np.testing.assert_allclose(out[:2, 2], np.clip(expected, -8, 8) / 4, rtol=1e-6)
    assert out[2, 2] == 0.0
    np.testing.assert_allclose(rule_probability(labels, ctx)[:2], 1 - ndtr(expected - biometry.Z_5TH))
    assert rule_probability(labels, ctx)[2] == 0.5


def _sector_batch(seed: int = 0) -> torch.Tensor:
    """Crops as preprocessing gives them: imaged pixels in (0, 1.2], a blank (0) border. The
    grey levels are distinct and well apart, so an increasing map computed in float32 can
    neither tie nor swap two of them."""
    g = torch.Generator().manual_seed(seed)
    n = 48 * 48
    image = torch.stack([(torch.randperm(n, generator=g) + 1).float() / n * 1.2 for _ in range(3)]).view(3, 1, 48, 48)
    image[..., :6, :] = 0.0
    image[..., :, -5:] = 0.0
    return image


def test_equalised_image_is_the_rank_of_each_imaged_pixel():
    image = torch.tensor([[[[0.0, 0.3, 0.1], [0.3, 0.0, 0.9]]]])
    # imaged pixels 0.3, 0.1, 0.3, 0.9: darker than each = 1, 0, 1, 3, out of 4
    expected = torch.tensor([[[[0.0, 0.25, 0.0], [0.25, 0.0, 0.75]]]])
    assert torch.equal(equalise(image), expected)
    assert torch.equal(equalise(torch.zeros(1, 1, 4, 4)), torch.zeros(1, 1, 4, 4))   # all blank


def test_equalised_classifier_ignores_gain_and_grey_curve_and_the_plain_one_does_not():
    """A scanner's gain, dynamic range and post-processing curve are increasing grey-level maps
    that keep black black: with `image_norm: equalise` the classifier's image branch receives
    exactly the same pixels for both, so nothing downstream can move; without it, it does not
    (so the check can fail). (The branch's input is compared, not the logits: two forward
    passes of one network need not agree to the last bit.)"""
    image = _sector_batch()
    other_scanner = 0.8 * image ** 1.6 + 0.05 * torch.sqrt(image)       # increasing, 0 -> 0
    masks = one_hot_masks(torch.randint(0, 3, (3, 48, 48), generator=torch.Generator().manual_seed(1)))
    ctx = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    for norm, invariant in (("equalise", True), ("none", False)):
        torch.manual_seed(0)
        net = make_classifier("asc-ga", 16, image_norm=norm).eval()
        seen: list[torch.Tensor] = []
        net.image.register_forward_pre_hook(lambda _module, args, seen=seen: seen.append(args[0].clone()))
        with torch.no_grad():
            a, b = net(image, masks, ctx), net(other_scanner, masks, ctx)
        assert torch.equal(seen[0], seen[1]) == invariant, norm
        assert torch.allclose(a, b, atol=1e-5) or not invariant
    with pytest.raises(ValueError, match="image_norm"):
        make_classifier("asc", 16, image_norm="clahe")


def test_a_saved_model_keeps_its_image_norm_and_older_models_load_without_it(tmp_path):
    """The option travels in the model's config.json, so `cbh predict` and the served model
    equalise exactly when training did; a model saved before the option existed loads as `none`."""
    import json

    from pipelines.serving.inference import ModelConfig, Predictor

    torch.manual_seed(0)
    cfg = ModelConfig("asc-ga", 16, (8, 16, 32), 48, 1.15, 0.5, image_norm="equalise")
    clf = make_classifier("asc-ga", 16, image_norm="equalise")
    Predictor(make_segmenter(cfg.seg_channels), clf, cfg).save(tmp_path)
    assert Predictor.load(tmp_path).cls.equalise
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["image_norm"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    old = Predictor.load(tmp_path)
    assert old.cfg.image_norm == "none" and not old.cls.equalise


def test_config_accepts_exactly_the_image_norms_there_are():
    """pipelines.config keeps its own copy (it must not import torch): the two agree."""
    from models.networks import IMAGE_NORMS
    from pipelines.config import IMAGE_NORMS as CHECKED

    assert CHECKED == IMAGE_NORMS
    from pipelines.config import SEG_NORMS as CHECKED_SEG

    assert CHECKED_SEG == SEG_NORMS
