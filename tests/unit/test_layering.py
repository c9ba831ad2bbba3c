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
