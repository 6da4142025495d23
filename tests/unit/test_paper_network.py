"""`asc-paper` (models/paper.py): the published backbones checked by parameter count against
their reference configurations, the published head and gate, both gate readings, ImageNet
weights from a local file."""

from __future__ import annotations

import pytest
import torch

from models.paper import (
    INCEPTION_V3_PARAMETERS,
    VGG16_BN_PARAMETERS,
    VGG16BN,
    Inception3,
    PaperASCNet,
    count_parameters,
    load_imagenet,
)

PUBLISHED_TOTAL = 165e6      # the published network, about 165 M parameters (issue 22)


def _small(gate: str = "sample") -> PaperASCNet:
    torch.manual_seed(0)
    return PaperASCNet(gate, width=0.125, out_features=64, feedforward=32, hidden=(32, 16)).eval()


def test_the_backbones_have_the_published_parameter_counts():
    """Layer for layer the reference configurations: Inception-v3 with its auxiliary head and
    VGG16-bn, both 3 channels in and 1000 classes out (torchvision's published counts)."""
    assert count_parameters(Inception3(3, 1000, aux_logits=True)) == INCEPTION_V3_PARAMETERS == 27_161_264
    assert count_parameters(VGG16BN(3, 1000)) == VGG16_BN_PARAMETERS == 138_365_992


def test_asc_paper_is_the_published_network():
    net = PaperASCNet()
    total = count_parameters(net)
    assert abs(total - PUBLISHED_TOTAL) / PUBLISHED_TOTAL < 0.05, total
    assert net.image.Conv2d_1a_3x3.conv.in_channels == 1 and net.image.fc.out_features == 1000
    assert net.image.AuxLogits is None                              # no 5x5 map for it at 224 px
    assert net.shape.features[0].in_channels == 2 and net.shape.classifier[-1].out_features == 1000
    assert net.attn.self_attn.num_heads == 1 and net.attn.linear1.out_features == 256
    assert (net.gate.in_features, net.gate.out_features) == (1000, 1000)
    linears = [m for m in net.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3000, 500), (500, 250), (250, 2)]
    assert {m.p for m in net.head if isinstance(m, torch.nn.Dropout)} == {0.4}


def test_a_shrunk_asc_paper_learns_on_cpu():
    net = _small().train()
    x, m = torch.randn(4, 1, 96, 96), torch.rand(4, 2, 96, 96)
    y = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    first = None
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(net(x, m), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    with pytest.raises(ValueError, match="needs the two masks"):
        net(x)


def test_the_per_sample_gate_ignores_the_batch_and_the_published_one_does_not():
    """The published gate runs the batch's pooled shape vectors as one sequence: a sample's
    answer changes with what it is batched with. The default reads each sample alone."""
    shape = torch.randn(4, 64)
    with torch.no_grad():
        sample = _small("sample")
        assert torch.allclose(sample.shape_gate(shape)[:2], sample.shape_gate(shape[:2]), atol=1e-6)
        batch = _small("batch")
        batch.load_state_dict(sample.state_dict())
        assert not torch.allclose(batch.shape_gate(shape)[:2], batch.shape_gate(shape[:2]), atol=1e-4)
        assert torch.allclose(batch.shape_gate(shape[:1]), sample.shape_gate(shape[:1]), atol=1e-6)  # alone
    with pytest.raises(ValueError, match="gate_reading"):
        PaperASCNet("mean")


def test_imagenet_weights_load_from_a_local_torchvision_state_dict(tmp_path):
    """A torchvision-layout state dict (3 channels, with the auxiliary head) loads unchanged but
    for the first convolutions: RGB summed for the grey image, averaged for each mask channel."""
    torch.manual_seed(1)
    w = 0.125
    inception, vgg = Inception3(3, 64, aux_logits=True, width=w), VGG16BN(3, 64, width=w)
    torch.save(inception.state_dict(), tmp_path / "inception.pth")
    torch.save(vgg.state_dict(), tmp_path / "vgg.pth")
    net = _small()
    done = load_imagenet(net, tmp_path / "inception.pth", tmp_path / "vgg.pth")
    assert len(done) == 2
    assert torch.equal(net.image.Mixed_6e.branch_pool.conv.weight, inception.Mixed_6e.branch_pool.conv.weight)
    assert torch.allclose(net.image.Conv2d_1a_3x3.conv.weight, inception.Conv2d_1a_3x3.conv.weight.sum(1, True))
    first = vgg.features[0].weight.mean(1, keepdim=True)
    assert torch.allclose(net.shape.features[0].weight, first.repeat(1, 2, 1, 1))
    assert torch.equal(net.shape.classifier[-1].weight, vgg.classifier[-1].weight)
