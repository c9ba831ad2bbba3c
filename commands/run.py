"""`neodragon run CHAIN -o OUT`: a chain of optimisation commands, each step's artifact the next one's
parent, cached by content (the chain itself is `pipelines/chain.py`; this module is the command line)."""

from __future__ import annotations

from pathlib import Path

import typer


def run(
    chain: str = typer.Argument(..., help="A chain recipe (shipped name, e.g. shapes/neodragon_chain, or YAML path)."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides of the chain (model=PATH) and steps.STEP.KEY=VALUE of a step's recipe or options."),
    out: Path = typer.Option(..., "-o", "--out", help="Chain folder: one NN-STEP/ folder per step, run.json."),
    from_step: str = typer.Option(None, "--from", help="Run STEP and every later step again, even when cached."),
    until: str = typer.Option(None, "--until", help="Stop after STEP."),
    list_only: bool = typer.Option(False, "--list", help="Validate the chain and show each step's state in OUT; run nothing."),
    report_only: bool = typer.Option(False, "--report", help="Only write OUT/report.md and report.json again from what OUT holds; run nothing."),
) -> None:
    """Run the chain's steps in order. A step whose parent and resolved recipe are unchanged is not run
    again; a stopped run continues where it stopped (a training step with its own resume). Every step's
    command and recipe are validated before any step runs (exit 2 with every problem found). After the
    run, OUT/report.md and OUT/report.json hold the paper's tables for it (missing steps: not run yet)."""
    from neodragon_cli.console import console
    from neodragon_cli.errors import UsageError
    from neodragon_cli.pipelines.chain import load_plan, preview, run_chain
    from neodragon_cli.pipelines.chain_report import REPORT_JSON, REPORT_MD, write_report

    if report_only and (list_only or from_step or until):
        raise UsageError("--report runs nothing: give it without --list, --from and --until")
    plan = load_plan(chain, overrides or [])
    if list_only:
        console.print(preview(plan, out).table())
        return
    if report_only:
        report = write_report(out)
        if report["chain_sha256"] != plan.chain_sha256:
            console.print("note: the chain (or an override) changed since OUT/run.json was written; the report shows the last run",
                          highlight=False)  # fmt: skip
        console.print(f"wrote {out / REPORT_MD} and {out / REPORT_JSON} (run {report['run']['status']})", highlight=False)
        return
    shown = {}

    def on_change(state) -> None:
        shown["run"] = state

    try:
        result = run_chain(plan, out, from_step=from_step, until=until, on_change=on_change)
    finally:
        if "run" in shown:
            console.print(shown["run"].table())
    ran = sum(s.state == "ran" for s in result.steps)
    cached = sum(s.state == "cached" for s in result.steps)
    console.print(f"{result.status}: {ran} ran, {cached} cached in {result.wall_s:.1f} s; {out / 'run.json'}, {out / REPORT_MD}", highlight=False)
    if result.status == "stopped":
        console.print("stopped: run the same command again to continue where it stopped", highlight=False)
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
