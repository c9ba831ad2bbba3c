import pytest
import torch

from neodragon_cli import registry
from neodragon_cli.errors import CheckpointError, UnknownNameError
from neodragon_cli.pipelines.models.checkpoint import load_state_dict_checked


def test_unknown_component_lists_known_with_did_you_mean():
    @registry.register("testkind", "alpha-net", detect=lambda p: False)
    class Alpha(torch.nn.Module):
        """An alpha."""

    try:
        with pytest.raises(UnknownNameError) as err:
            registry.get("testkind/alpha-nett")
        assert "did you mean 'alpha-net'" in err.value.one_line()
        with pytest.raises(UnknownNameError, match="known kinds"):
            registry.components("nosuchkind")
    finally:
        registry._REGISTRY.pop("testkind")


def test_checked_load_names_first_offending_keys():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model[0].weight.detach().clone()
    bad = dict(state)
    bad.pop("1.bias")
    bad["0.weight"] = torch.zeros(3, 3)
    bad["2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_checked(model, bad, source="ckpt")
    msg = err.value.message
    assert "missing keys: 1.bias" in msg and "unexpected keys: 2.weight" in msg and "0.weight (3, 3)" in msg
    assert torch.equal(model[0].weight, before)  # nothing was loaded


def test_load_component_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        registry.load_component("mmdit", tmp_path / "nope")
