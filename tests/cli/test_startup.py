"""Start-up stays cheap: `neodragon --version` imports neither typer nor torch, and building the whole
app (every command registered, as `--help` does) imports no torch or numpy: command modules import
them inside their handlers. Timings are in benchmarks/cli_startup.py; these tests check the cause."""

from __future__ import annotations

import json
import subprocess
import sys

_VERSION = """
import json, sys
sys.argv = ["neodragon", "--version"]
from neodragon_cli.app import main
main()
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy", "typer", "rich"})))
"""

_BUILD = """
import json, sys
from typer.main import get_command
from neodragon_cli.app import app
names = sorted(get_command(app).commands)
print(json.dumps({"commands": names, "heavy": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy"})}))
"""


def _first_and_last_line(script: str):
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[0], json.loads(done.stdout.strip().splitlines()[-1])


def test_version_answers_without_importing_typer_or_torch():
    first_line, heavy = _first_and_last_line(_VERSION)
    assert first_line.startswith("neodragon ")
    assert heavy == [], f"--version imported {heavy}"


def test_building_the_app_imports_no_torch_or_numpy():
    _, found = _first_and_last_line(_BUILD)
    assert {"generate", "eval", "train", "recipes"} <= set(found["commands"])
    assert found["heavy"] == [], f"a command module imports {found['heavy']} at the top; import it inside the handler"
