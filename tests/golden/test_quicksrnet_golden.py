"""QuickSRNet Small / Medium / Large against the aimet-model-zoo fixtures (published .pth.tar layout).

Variants, checkpoints, state-dict layouts, output shapes, parameter counts and tolerances come from
the fixture's case.json."""

from __future__ import annotations

import re

import pytest
import torch
from golden_case import case, params, tol

from neodragon_cli import load_component
from neodragon_cli.errors import CheckpointError
from neodragon_cli.registry import detect

pytestmark = pytest.mark.golden


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())

FIXTURE = "quicksrnet"


def _case(golden_dir):
    folder = golden_dir / FIXTURE
    meta, tensors = case(folder)
    return folder, meta, tensors


@pytest.mark.parametrize("variant", params(FIXTURE, lambda meta: list(meta["variants"])))
def test_outputs_match_reference(golden_dir, variant):
    folder, meta, tensors = _case(golden_dir)
    info = meta["variants"][variant]
    tolerance = tol(meta["tolerance"]["output"])
    model = load_component("sr", folder / info["checkpoint"])  # the file name picks the variant
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == info["state_dict_shapes"]
    assert count_parameters(model) == info["num_params"]
    assert model.scaling_factor == meta["scale"]
    x = tensors["input"]
    with torch.no_grad():
        out = model(x)
        pre_clip = model.conv_last(model.cnn(x)) + (model.anchor(x) if model.anchor is not None else 0)
    # README: pre_clip is compared with the output tolerance
    torch.testing.assert_close(pre_clip, tensors[f"{variant}/debug/pre_clip"], **tolerance)
    assert list(out.shape) == info["output_shape"]
    torch.testing.assert_close(out, tensors[f"{variant}/output"], **tolerance)


def _scale(name: str) -> float:
    return float(name.rstrip("x"))


def _param_count_cases(meta):
    # Sub-check left out: the reference's fractional scale (1.5x) is not implemented here (integer
    # PixelShuffle scales only), so only the integer scales recorded in param_counts are checked.
    return [
        pytest.param(variant, name, id=f"{variant}-{name}")
        for variant, counts in meta["param_counts"].items()
        for name in counts
        if _scale(name).is_integer()
    ]


@pytest.mark.parametrize("variant,scale", params(FIXTURE, _param_count_cases, 2))
def test_parameter_counts(golden_dir, variant, scale):
    folder, meta, _ = _case(golden_dir)
    (info,) = [v for name, v in meta["variants"].items() if name == variant]
    cls = type(load_component("sr", folder / info["checkpoint"]))  # the variant as the registry picks it
    assert count_parameters(cls(scaling_factor=int(_scale(scale)))) == meta["param_counts"][variant][scale]


def _mismatched_pairs(meta):
    """(checkpoint variant, loaded as variant) for every two variants with different layouts."""
    names = list(meta["variants"])
    return [
        pytest.param(a, b, id=f"{a}-as-{b}")
        for a in names
        for b in names
        if meta["variants"][a]["state_dict_shapes"] != meta["variants"][b]["state_dict_shapes"]
    ]


@pytest.mark.parametrize("stored,as_variant", params(FIXTURE, _mismatched_pairs, 2))
def test_wrong_variant_names_keys(golden_dir, stored, as_variant):
    """Loading one variant's checkpoint as another names the first missing / unexpected / wrongly shaped
    keys, which follow from the two recorded layouts."""
    folder, meta, _ = _case(golden_dir)
    theirs = meta["variants"][stored]["state_dict_shapes"]
    target_file = folder / meta["variants"][as_variant]["checkpoint"]
    (component,) = detect(target_file, "sr")
    model_keys = list(load_component("sr", target_file).state_dict())  # our key order
    ours = meta["variants"][as_variant]["state_dict_shapes"]
    missing = [k for k in model_keys if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [
        f"{k} {tuple(theirs[k])} vs model {tuple(ours[k])}" for k in model_keys if k in theirs and theirs[k] != ours[k]
    ]
    with pytest.raises(CheckpointError) as info:
        load_component(component.key, folder / meta["variants"][stored]["checkpoint"])
    message = str(info.value)
    for label, listed in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if listed:
            assert re.search(rf"{label}: {re.escape(listed[0])}", message), (label, listed[0], message)
        else:
            assert f"{label}:" not in message, message
