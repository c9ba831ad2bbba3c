"""Layering: the library (`neodragon_cli.pipelines`) never imports the command-line layer (typer, the
app, the command modules), neither when its modules are imported nor when recipe schemas are looked up.
Checked in a fresh interpreter, so nothing imported by other tests hides an import."""

from __future__ import annotations

import json
import subprocess
import sys

CLI_LAYER = ("typer", "neodragon_cli.app", "neodragon_cli.commands")

_SCRIPT = """
import importlib, json, pkgutil, sys
import neodragon_cli.pipelines as library
modules = [m.name for m in pkgutil.walk_packages(library.__path__, library.__name__ + ".")]
for name in modules:
    importlib.import_module(name)
from neodragon_cli import recipes
commands = sorted(recipes.schemas())
layers = tuple(sys.argv[1:])
cli = sorted(m for m in sys.modules if any(m == layer or m.startswith(layer + ".") for layer in layers))
print(json.dumps({"modules": modules, "commands": commands, "cli": cli}))
"""


def test_library_modules_and_recipe_schemas_do_not_import_the_cli_layer():
    done = subprocess.run([sys.executable, "-c", _SCRIPT, *CLI_LAYER], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "neodragon_cli.pipelines.flow.pipeline" in found["modules"]
    assert "generate" in found["commands"]
    assert found["cli"] == [], f"the library imported the CLI layer: {found['cli']}"


def test_declared_dependencies_are_exactly_the_third_party_imports():
    import ast
    import re
    import tomllib
    from importlib.metadata import packages_distributions
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    distributions = packages_distributions()
    imported: dict[str, str] = {}
    for folder in ("neodragon_cli", "commands", "pipelines"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("neodragon_cli", "__future__"):
                        imported.setdefault(top, str(path.relative_to(root)))
    needed = {distributions[top][0].lower().replace("_", "-"): where for top, where in imported.items()}
    assert set(needed) - declared == set(), {d: needed[d] for d in set(needed) - declared}
    assert declared - set(needed) == set(), "declared but never imported"
