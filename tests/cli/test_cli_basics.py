"""The app's surface: help, version, recipe errors exit 2 with a few lines and no traceback."""

from typer.testing import CliRunner

from neodragon_cli import __version__
from neodragon_cli.app import app

runner = CliRunner()


def test_help_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "recipes" in result.output and "components" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_components_list():
    assert runner.invoke(app, ["components", "list"]).exit_code == 0


def test_shipped_recipes_validate():
    from neodragon_cli.recipes import shipped_recipes

    names = list(shipped_recipes())
    if not names:
        return
    result = runner.invoke(app, ["recipes", "validate", *names])
    assert result.exit_code == 0, result.output


def _check_one_problem(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 4, result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_recipe_errors_exit_2(tmp_path):
    from neodragon_cli.recipes import schemas

    command = next(iter(schemas()))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"command: {command}\nbogus_key: 1\n")
    _check_one_problem(runner.invoke(app, ["recipes", "validate", str(unknown)]), "bogus_key")
    wrong_type = tmp_path / "wrongtype.yaml"
    wrong_type.write_text("extends: shapes/teacher_vae\ntrain:\n  max_steps: many\n")
    _check_one_problem(runner.invoke(app, ["recipes", "validate", str(wrong_type)]), "train.max_steps", "expected int")
    not_yaml = tmp_path / "notyaml.yaml"
    not_yaml.write_text("a: [1, 2\nb: }\n")
    _check_one_problem(runner.invoke(app, ["recipes", "validate", str(not_yaml)]), "not valid YAML")
    missing = tmp_path / "nope.yaml"
    _check_one_problem(runner.invoke(app, ["recipes", "validate", str(missing)]), "nope.yaml")


def test_unknown_component_kind_exit_2():
    result = runner.invoke(app, ["components", "list", "mmditt"])
    _check_one_problem(result, "unknown component kind")
