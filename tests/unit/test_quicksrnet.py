"""QuickSRNet: the input-repeat initialisation, checkpoint round trips, detection and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neodragon_cli import load_component, registry
from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.models.quicksrnet import QuickSRNet, QuickSRNetLarge, QuickSRNetMedium, QuickSRNetSmall


def _strip_to_init_terms(model: QuickSRNet) -> QuickSRNet:
    """Zero every weight, then re-apply only the initialisation's identity / repeat terms."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.initialize()
    return model


@pytest.mark.parametrize("cls", [QuickSRNetSmall, QuickSRNetMedium, QuickSRNetLarge])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_initialisation_is_nearest_upsampling(cls, scale):
    """With only the init terms, every variant is nearest-neighbour upsampling of an image in [0, 1]."""
    model = _strip_to_init_terms(cls(scale)).eval()
    x = torch.rand(2, 3, 5, 7)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=scale, mode="nearest"), atol=1e-6, rtol=0)


def test_fresh_anchor_is_channel_repeat():
    model = QuickSRNetLarge(3)
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.anchor(x), x.repeat_interleave(9, dim=1))
    assert model.anchor.net.weight.requires_grad  # trainable, unlike a fixed repeat


def test_fresh_model_output_range_and_shape():
    torch.manual_seed(0)
    out = QuickSRNetSmall(4)(torch.rand(1, 3, 6, 9))
    assert out.shape == (1, 3, 24, 36)
    assert out.min() >= 0 and out.max() <= 1


def test_round_trips(tmp_path):
    torch.manual_seed(1)
    model = QuickSRNetMedium(3).eval()
    x = torch.rand(1, 3, 8, 8)
    model.save_pretrained(tmp_path / "folder")
    model.save_published(tmp_path / "quicksrnet_medium_3x_checkpoint_float32.pth.tar")
    for path in (tmp_path / "folder", tmp_path / "quicksrnet_medium_3x_checkpoint_float32.pth.tar"):
        assert [c.key for c in registry.detect(path, "sr")] == ["sr/quicksrnet-medium"]
        loaded = load_component("sr", path)
        assert isinstance(loaded, QuickSRNetMedium) and loaded.scaling_factor == 3
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_generic_class_reads_config_from_shapes(tmp_path):
    custom = QuickSRNet(scaling_factor=2, num_channels=8, num_intermediate_layers=1, use_ito_connection=True)
    custom.save_published(tmp_path / "custom.pth")
    loaded = QuickSRNet.from_pretrained(tmp_path / "custom.pth")
    assert loaded.config == custom.config


def test_errors(tmp_path):
    with pytest.raises(UsageError, match="scale 5"):
        QuickSRNetSmall(5)
    torch.save({"state_dict": {"weight": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="not a QuickSRNet checkpoint"):
        QuickSRNetSmall.from_pretrained(tmp_path / "x.pth")
    state = QuickSRNetSmall(2).state_dict()
    state.pop("conv_last.bias")
    torch.save({"state_dict": state}, tmp_path / "y.pth")
    with pytest.raises(CheckpointError, match="missing keys: conv_last.bias"):
        load_component("sr/quicksrnet-small", tmp_path / "y.pth")
