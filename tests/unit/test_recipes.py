"""Recipe loading: strict keys, types, overrides, inheritance, all problems at once."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from neodragon_cli import recipes as R
from neodragon_cli.errors import RecipeError


@dataclass
class _Optim:
    lr: float = field(default=1e-3, metadata={"doc": "learning rate"})
    kind: Literal["adam", "adamw"] = "adamw"


@dataclass
class _Toy:
    width: int = field(metadata={"doc": "model width"})
    steps: list[int] = field(default_factory=lambda: [1, 1, 1])
    name: str | None = None
    optim: _Optim = field(default_factory=_Optim)

    def validate(self):
        return ["width must be positive"] if self.width <= 0 else []


@pytest.fixture(autouse=True)
def _toy_schema():
    R.recipe_schema("toy-test")(_Toy)
    yield
    R._SCHEMAS.pop("toy-test", None)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_recipe_with_defaults_and_types(tmp_path):
    p = _write(tmp_path, "r.yaml", "command: toy-test\nwidth: 8\noptim:\n  lr: 1\n")
    obj = R.load(p)
    assert obj.width == 8 and obj.steps == [1, 1, 1]
    assert isinstance(obj.optim.lr, float) and obj.optim.lr == 1.0


def test_all_problems_reported_with_lines(tmp_path):
    p = _write(tmp_path, "r.yaml", "command: toy-test\nwidth: eight\noptim:\n  lrr: 0.1\n  kind: sgd\nextra: 1\n")
    with pytest.raises(RecipeError) as err:
        R.load(p)
    problems = err.value.problems
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "r.yaml:2: width: expected int" in text
    assert "r.yaml:4: unknown key 'optim.lrr'" in text and "did you mean 'lr'" in text
    assert "r.yaml:5: optim.kind" in text
    assert "unknown key 'extra'" in text


def test_overrides_are_typed_by_schema(tmp_path):
    p = _write(tmp_path, "r.yaml", "command: toy-test\nwidth: 8\n")
    obj = R.load(p, ["optim.lr=1e-3", "steps=[4,4,4]", "name=run1"])
    assert obj.optim.lr == 1e-3 and obj.steps == [4, 4, 4] and obj.name == "run1"
    with pytest.raises(RecipeError, match="width: expected int"):
        R.load(p, ["width=abc"])
    with pytest.raises(RecipeError, match="not of the form"):
        R.load(p, ["width"])


def test_schema_validate_hook(tmp_path):
    p = _write(tmp_path, "r.yaml", "command: toy-test\nwidth: -1\n")
    assert any("width must be positive" in m for m in R.validate(p))


def test_missing_required_key(tmp_path):
    p = _write(tmp_path, "r.yaml", "command: toy-test\n")
    assert any("missing required key 'width'" in m for m in R.validate(p))


def test_inheritance_merges_and_child_wins(tmp_path):
    _write(tmp_path, "base.yaml", "command: toy-test\nwidth: 8\noptim:\n  lr: 0.1\n  kind: adam\n")
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\noptim:\n  lr: 0.2\n")
    obj = R.load(child)
    assert obj.width == 8 and obj.optim.lr == 0.2 and obj.optim.kind == "adam"


def test_inheritance_cycle(tmp_path):
    _write(tmp_path, "a.yaml", "extends: b.yaml\ncommand: toy-test\nwidth: 1\n")
    b = _write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        R.load(b)


def test_not_yaml_and_not_mapping(tmp_path):
    bad = _write(tmp_path, "bad.yaml", "command: [unclosed\n")
    assert "not valid YAML" in R.validate(bad)[0]
    scalar = _write(tmp_path, "s.yaml", "just a string\n")
    assert "must be a YAML mapping" in R.validate(scalar)[0]


def test_dump_round_trips(tmp_path):
    p = _write(tmp_path, "r.yaml", "command: toy-test\nwidth: 8\n")
    obj = R.load(p, ["optim.kind=adam"])
    again = _write(tmp_path, "again.yaml", R.dump(obj))
    assert R.load(again) == obj


def test_every_shipped_recipe_validates():
    shipped = R.shipped_recipes()
    for name in shipped:
        assert R.validate(name) == [], name


def test_sampling_settings_have_one_source_of_defaults_and_docs():
    import dataclasses

    from neodragon_cli.pipelines.flow.settings import KNOBS, GenerationSettings, SamplingConfig

    config_fields = {f.name: f for f in dataclasses.fields(SamplingConfig)}
    settings_fields = {f.name: f for f in dataclasses.fields(GenerationSettings)}
    for knob in KNOBS:
        assert settings_fields[knob].default is None  # unset: a layer over the model's defaults
        assert settings_fields[knob].metadata["doc"] == config_fields[knob].metadata["doc"]
    video = GenerationSettings(mode="monolithic", frames=9, height=64, width=64, fps=8).resolved()
    assert video.sampling_config() == SamplingConfig()
    assert R.schema_for("generate").__dataclass_fields__["sampling"].default_factory is GenerationSettings


def test_sampling_config_is_a_strict_recipe_section(tmp_path):
    from neodragon_cli.pipelines.flow.settings import SamplingConfig

    @dataclass
    class _WithSampling:
        sampling: SamplingConfig = field(default_factory=SamplingConfig)

    R.recipe_schema("toy-test")(_WithSampling)  # the fixture removes it again
    path = tmp_path / "s.yaml"
    path.write_text("command: toy-test\nsampling: {video_steps: [2, 2, 2], history_noise: 0.3}\n")
    loaded = R.load(path)
    assert loaded.sampling == SamplingConfig(video_steps=(2, 2, 2), history_noise=0.3)
    assert R.validate(path, ["sampling.history_noise=1.5"]) == [f"{path.name}:2: sampling: history_noise must be in [0, 1), got 1.5"]
    assert "unknown key 'sampling.steps'" in R.validate(path, ["sampling.steps=[1, 1, 1]"])[0]
