"""The REG objective against a hand computation with pinned t and noise (docs/design.md#method)."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss import encoder_targets, projection_loss, reg_loss, sample_latents
from models.sit import SiT
from reg.interpolant import interpolant, sample_time

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
            num_classes=10, z_dims=[32], encoder_depth=1, projector_dim=48)


class Recorder(torch.nn.Module):
    """Wraps a model and remembers what it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y, cls_token=None):
        self.inputs = (x, t, y, cls_token)
        self.outputs = self.model(x, t, y, cls_token=cls_token)
        return self.outputs


def randomised(model):
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_reg_loss_matches_hand_computation(path_type):
    torch.manual_seed(0)
    model = Recorder(randomised(SiT(**TINY)))
    x0, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    c0, z_enc = torch.randn(3, 32), torch.randn(3, 17, 32)
    t, eps, eps_c = torch.tensor([0.1, 0.5, 0.9]), torch.randn(3, 4, 8, 8), torch.randn(3, 32)
    out = reg_loss(model, x0, y, cls_target=c0, zs_target=[z_enc], path_type=path_type,
                   proj_coeff=0.5, cls_coeff=0.03, t=t, noise=eps, cls_noise=eps_c)

    if path_type == "linear":
        a, s, da, ds = 1 - t, t, -torch.ones(3), torch.ones(3)
    else:
        a, s = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
        da, ds = -math.pi / 2 * torch.sin(math.pi * t / 2), math.pi / 2 * torch.cos(math.pi * t / 2)
    b = lambda v: v.view(3, 1, 1, 1)
    x_t, v = b(a) * x0 + b(s) * eps, b(da) * x0 + b(ds) * eps
    c_t, v_c = a[:, None] * c0 + s[:, None] * eps_c, da[:, None] * c0 + ds[:, None] * eps_c
    assert torch.allclose(model.inputs[0], x_t, atol=1e-6) and torch.allclose(model.inputs[3], c_t, atol=1e-6)
    assert torch.equal(model.inputs[1], t)
    v_hat, zs_hat, v_c_hat = model.outputs
    denoise = ((v_hat - v) ** 2).mean(dim=(1, 2, 3))
    cls = ((v_c_hat - v_c) ** 2).mean(dim=1)
    proj = -F.cosine_similarity(z_enc, zs_hat[0], dim=-1).mean(dim=1)
    total = denoise.mean() + 0.5 * proj.mean() + 0.03 * cls.mean()
    for got, want in ((out.denoise, denoise), (out.cls, cls), (out.proj, proj)):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(out.loss, total, atol=1e-6)


def test_repa_mode_drops_class_token_target_and_plain_mode():
    torch.manual_seed(1)
    repa = randomised(SiT(**TINY, use_cls_token=False))
    x0, y, z_enc = torch.randn(2, 4, 8, 8), torch.tensor([0, 1]), torch.randn(2, 17, 32)
    t, eps = torch.tensor([0.3, 0.7]), torch.randn(2, 4, 8, 8)
    out = reg_loss(repa, x0, y, zs_target=[z_enc], t=t, noise=eps)
    assert out.cls is None
    _, zs_hat, _ = repa(x0 * (1 - t.view(2, 1, 1, 1)) + t.view(2, 1, 1, 1) * eps, t, y)
    assert torch.allclose(out.proj, -F.cosine_similarity(z_enc[:, 1:], zs_hat[0], dim=-1).mean(1), atol=1e-6)
    plain = randomised(SiT(**{**TINY, "z_dims": []}, use_cls_token=False))
    out = reg_loss(plain, x0, y, t=t, noise=eps)
    assert out.proj is None and out.cls is None and torch.allclose(out.loss, out.denoise.mean())


def test_projection_loss_is_fp32_and_averages_encoders():
    z1, z2 = torch.randn(2, 5, 8), torch.randn(2, 5, 16)
    h1, h2 = torch.randn(2, 5, 8).half(), torch.randn(2, 5, 16).half()
    got = projection_loss([z1, z2], [h1, h2])
    assert got.dtype == torch.float32
    want = (-F.cosine_similarity(z1, h1.float(), -1).mean(1) - F.cosine_similarity(z2, h2.float(), -1).mean(1)) / 2
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="do not match projector output"):
        projection_loss([torch.randn(2, 6, 8)], [h1])


def test_sample_latents_and_time_sampling():
    mean, std = torch.randn(4, 4, 2, 2), torch.rand(4, 4, 2, 2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    z = sample_latents(torch.cat([mean, std], 1), scale=0.18215, generator=g1)
    assert torch.allclose(z, (mean + std * torch.randn(4, 4, 2, 2, generator=g2)) * 0.18215)
    g = torch.Generator().manual_seed(0)
    n = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    t = sample_time(20000, weighting="lognormal", path_type="linear", generator=g)
    assert torch.allclose(t, torch.exp(n) / (1 + torch.exp(n)))
    tc = sample_time(20000, weighting="lognormal", path_type="cosine", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(tc, 2 / math.pi * torch.atan(torch.exp(n)))
    u = sample_time(20000, weighting="uniform")
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.02
    a, s, da, ds = interpolant(torch.tensor([0.25]), "cosine")  # derivative check by finite differences
    a2, s2, _, _ = interpolant(torch.tensor([0.25 + 1e-3]), "cosine")
    assert abs((a2 - a) / 1e-3 - da) < 1e-2 and abs((s2 - s) / 1e-3 - ds) < 1e-2
    with pytest.raises(ValueError, match="unknown path type"):
        interpolant(torch.tensor([0.5]), "edm")
    with pytest.raises(ValueError, match="unknown time weighting"):
        sample_time(3, weighting="beta")


def test_encoder_targets_concatenate_class_and_patch_tokens():
    class FakeEncoder(torch.nn.Module):
        def __init__(self, z):
            super().__init__()
            self.z = z

        def forward(self, images):
            n = images.shape[0]
            return torch.full((n, self.z), 1.0), torch.full((n, 4, self.z), 2.0)

    zs, cls = encoder_targets([FakeEncoder(8), FakeEncoder(16)], torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert [z.shape for z in zs] == [(2, 5, 8), (2, 5, 16)]
    assert torch.all(zs[0][:, 0] == 1) and torch.all(zs[0][:, 1:] == 2) and cls.shape == (2, 16)  # the last encoder's, as REG


def test_only_v_prediction():
    with pytest.raises(ValueError, match="v-prediction"):
        reg_loss(SiT(**TINY), torch.randn(1, 4, 8, 8), torch.tensor([0]), prediction="noise")
