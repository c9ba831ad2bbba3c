"""QuickSRNet Small / Medium / Large against the aimet-model-zoo fixtures (published .pth.tar layout)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from neodragon_cli import load_component
from neodragon_cli.errors import CheckpointError
from neodragon_cli.pipelines.models.checkpoint import count_parameters
from neodragon_cli.pipelines.models.quicksrnet import QuickSRNetLarge, QuickSRNetMedium, QuickSRNetSmall

pytestmark = pytest.mark.golden

CLASSES = {"small": QuickSRNetSmall, "medium": QuickSRNetMedium, "large": QuickSRNetLarge}


def _case(golden_dir):
    folder = golden_dir / "quicksrnet"
    return folder, json.loads((folder / "case.json").read_text()), load_file(str(folder / "case.safetensors"))


@pytest.mark.parametrize("variant", ["small", "medium", "large", "large_anchor_perturbed"])
def test_outputs_match_reference(golden_dir, variant):
    folder, meta, tensors = _case(golden_dir)
    info = meta["variants"][variant]
    model = load_component("sr", folder / info["checkpoint"])  # the file name picks the variant
    assert type(model).__name__ == info["reference_class"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == info["state_dict_shapes"]
    x = tensors["input"]
    with torch.no_grad():
        out = model(x)
        pre_clip = model.conv_last(model.cnn(x)) + (model.anchor(x) if model.anchor is not None else 0)
    torch.testing.assert_close(pre_clip, tensors[f"{variant}/debug/pre_clip"], atol=1e-5, rtol=1e-5)
    assert list(out.shape) == info["output_shape"]
    tol = meta["tolerance"]["output"]
    torch.testing.assert_close(out, tensors[f"{variant}/output"], atol=tol["atol"], rtol=tol["rtol"])


@pytest.mark.parametrize("variant", ["small", "medium", "large"])
def test_parameter_counts(golden_dir, variant):
    _, meta, _ = _case(golden_dir)
    for scale in (2, 3, 4):
        assert count_parameters(CLASSES[variant](scale)) == meta["param_counts"][variant][f"{scale}x"]


def test_wrong_variant_names_keys(golden_dir):
    folder, meta, _ = _case(golden_dir)
    with pytest.raises(CheckpointError, match=r"unexpected keys: cnn\.6\.weight"):
        load_component("sr/quicksrnet-small", folder / meta["variants"]["medium"]["checkpoint"])
    with pytest.raises(CheckpointError, match=r"wrong shapes: cnn\.0\.weight \(64, 3, 3, 3\) vs model \(32, 3, 3, 3\)"):
        load_component("sr/quicksrnet-medium", folder / meta["variants"]["large"]["checkpoint"])
