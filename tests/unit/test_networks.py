"""The networks' shapes for every backbone MONAI provides here (random weights, no download)."""

import pytest
import torch

from models.lightning import one_hot_masks
from models.networks import BACKBONES, make_classifier, make_segmenter


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
