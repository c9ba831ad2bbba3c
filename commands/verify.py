"""`neodragon verify ARTIFACT`: check every file hash and the provenance chain of an artifact."""

from __future__ import annotations

from pathlib import Path

import typer


def verify(
    artifact: str = typer.Argument(..., help="Artifact folder, or an embedded model's name (e.g. shapes-teacher)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """Re-hash every file of ARTIFACT against its state.json and check that each operation of its
    chain names the previous one's output as its parent. Exit 0 when it verifies; exit 1 naming
    the first mismatch."""
    from neodragon_cli.artifacts import read_state, resolve_model, verify_artifact
    from neodragon_cli.atomic import write_json
    from neodragon_cli.console import console
    from neodragon_cli.errors import NeodragonError

    folder = resolve_model(artifact)
    problems = verify_artifact(folder)
    operations = [op["operation"] for op in read_state(folder).get("operations", [])] if not problems else []
    if json_out is not None:
        write_json(json_out, {"artifact": str(folder), "ok": not problems, "problems": problems, "operations": operations})
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise NeodragonError(problems[0] + more)
    files = len(read_state(folder)["files"])
    console.print(f"ok: {artifact}: {files} files, {len(operations)} operations ({' > '.join(operations)})",
                  highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
