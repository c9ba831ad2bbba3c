"""`neodragon profile`: per-module latency and peak memory (the paper's Table 7), end-to-end time,
the compute model, and CI budgets.

    neodragon profile shapes-teacher --runs 5 --json profile.json --png profile.png
    neodragon profile EXPORTED --runtime onnx --fail-over mmdit_stage2=50 --baseline old.json --max-regression 10%
    neodragon profile QUANTIZED --runtime qnn                 # QNN HTP simulator: op coverage, not latency
    neodragon profile EXPORTED --runtime aihub --device "Snapdragon 8 Elite QRD"
    neodragon profile --analytic real:neodragon               # eqs. 1-9 + FLOPs per module, no run
    neodragon profile --analytic shapes-teacher --runtime torch --steps 1-1-1   # measured vs predicted

Exit 1 exactly when a --fail-over budget or the --max-regression threshold is exceeded (the report is
written first); exit 2 with one line on bad input, before any work. See docs/profile.md.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _settings(height, width, frames, steps, mode):
    from neodragon_cli.pipelines.flow.scheduler import parse_steps
    from neodragon_cli.pipelines.flow.settings import GenerationSettings

    from neodragon_cli.errors import UsageError

    if mode is not None and mode not in ("hybrid", "monolithic"):
        raise UsageError(f"unknown mode '{mode}'", hint="use hybrid or monolithic")
    parsed = None
    if steps is not None:
        try:
            parsed = list(parse_steps(steps))
        except ValueError as exc:
            raise UsageError(f"--steps: {exc}") from None
    settings = GenerationSettings(mode=mode, first_steps=parsed, video_steps=parsed, frames=frames, height=height, width=width)
    problems = settings.validate()
    if problems:
        raise UsageError(problems[0])
    return settings


def profile(
    model: str = typer.Argument(..., help="Model folder or embedded name, an export or quantize artifact, or (with --analytic) real:neodragon / real:pyramid-flow."),
    runtime: str = typer.Option(None, "--runtime", help="torch (model), onnx (CPU EP), qnn (HTP simulator) or aihub (default: torch for a model, onnx for an artifact; none with --analytic alone)."),
    device: str = typer.Option(None, "--device", help="AI Hub device name (--runtime aihub)."),
    runs: int = typer.Option(5, "--runs", help="Timed calls per module, after one warm-up call."),
    json_path: Path = typer.Option(None, "--json", help="Write the report here (validated against the documented schema)."),
    png: Path = typer.Option(None, "--png", help="Write a latency / memory breakdown plot per module here."),
    fail_over: list[str] = typer.Option(None, "--fail-over", help="MODULE=MS budget on the median latency per call (a module, a role, or end_to_end; repeatable): exit 1 when exceeded."),
    baseline: Path = typer.Option(None, "--baseline", help="A previous --json report to compare median latencies with."),
    max_regression: str = typer.Option(None, "--max-regression", help="With --baseline: exit 1 when a module is slower by more than this, e.g. 10%."),
    analytic: bool = typer.Option(False, "--analytic", help="Add the compute model (eqs. 1-9) and FLOPs per module per stage; alone, nothing is run."),
    height: int = typer.Option(None, "--height", help="Video height (default: the model's)."),
    width: int = typer.Option(None, "--width", help="Video width (default: the model's)."),
    frames: int = typer.Option(None, "--frames", help="Video frames, 1 + 8k (default: the model's)."),
    steps: str = typer.Option(None, "--steps", help="Steps per pyramid stage, e.g. 1-1-1 (default: the model's)."),
    mode: str = typer.Option(None, "--mode", help="hybrid or monolithic (default: the model's)."),
    dtype: str = typer.Option("fp32", "--dtype", help="torch runtime: bf16, fp16 or fp32."),
    seed: int = typer.Option(0, "--seed", help="Seed of the end-to-end generation."),
    modules: str = typer.Option(None, "--modules", help="real:* sizes: a comma list of modules or roles to measure (default all)."),
) -> None:
    """Per-module latency (min / median of --runs, load time apart) and peak memory per pipeline role,
    end-to-end generation time, as a Table-7-shaped table and a JSON report; budgets and regression
    checks for CI (exit 1); the paper's compute model with --analytic."""
    from neodragon_cli.pipelines.deploy import profile as prof

    from neodragon_cli.artifacts import resolve_model
    from neodragon_cli.errors import UsageError
    from neodragon_cli.paths import check_output_file

    # ---- every check before any work
    if runs < 0 or (runs == 0 and not model.startswith("real:")):
        raise UsageError(f"--runs must be at least 1, got {runs}", hint="--runs 0 (the warm-up call only) is for real:* sizes")
    budgets = prof.parse_budgets(fail_over)
    threshold = prof.parse_regression(max_regression)
    if (baseline is None) != (threshold is None):
        raise UsageError("give --baseline and --max-regression together")
    old = prof.read_report(baseline) if baseline is not None else None
    for path in (json_path, png):
        if path is not None:
            check_output_file(path)
    if png is not None and png.suffix.lower() != ".png":
        raise UsageError(f"--png {png}: the plot is a PNG file", hint="name it *.png")
    settings = _settings(height, width, frames, steps, mode)
    if dtype not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"unknown dtype '{dtype}'", hint="use bf16, fp16 or fp32")
    from neodragon_cli.pipelines.deploy.analytic import REAL_SIZES

    if model.startswith("real:"):
        if model not in REAL_SIZES:
            raise UsageError(f"unknown real-size pipeline '{model}'", hint=f"use one of: {', '.join(REAL_SIZES)}")
        if runtime not in (None, "none", "torch"):
            raise UsageError(f"{model} is a published size with random weights: it runs with --runtime torch only",
                             hint="or --analytic alone for the compute model")  # fmt: skip
        target = prof.Target(Path(model), "real-size", model)
        runtime = runtime or ("none" if analytic else "torch")
    else:
        path = resolve_model(model)
        kind = prof.detect_kind(path)
        target = prof.Target(path, kind, path.name)
        if runtime is None:
            runtime = "none" if analytic and not (budgets or old) else ("torch" if kind == "model" else "onnx")
        if runtime != "none":
            prof.check_runtime(kind, runtime)
    if runtime == "none" and (budgets or old or png is not None):
        raise UsageError("--fail-over, --baseline and --png need a measurement", hint="add --runtime")
    if runtime == "qnn":
        prof.check_qnn_available()
    if runtime == "aihub":
        from neodragon_cli.pipelines.deploy.aihub import check_ready

        check_ready(device)
    elif device is not None:
        raise UsageError("--device names an AI Hub device", hint="use it with --runtime aihub")

    # ---- work
    from neodragon_cli.console import console

    def say(message: str) -> None:
        console.print(f"[dim]{message}[/]", highlight=False)

    if runtime == "none":
        report = _analytic_only(target, settings, say)
    elif target.kind == "real-size":
        report = _real_size(target, settings, runs, dtype, modules, say)
    elif runtime == "aihub":
        report = _aihub(target, settings, device, seed, say)
    else:
        report = prof.profile_pipeline(target, runtime=runtime, settings=settings, runs=runs, seed=seed, dtype=dtype, progress=say)
    if analytic and runtime != "none":
        report["analytic"] = _analytic_for(target, report, settings, say)
    violations = prof.check_budgets(report, budgets) if report["modules"] else []
    compared = {}
    if old is not None:
        regressions, compared = prof.check_regression(report, old, threshold)
        violations += regressions
    if budgets or old is not None:
        report["checks"] = {"passed": not violations, "violations": violations, "budgets": [{"name": b.name, "ms": b.ms} for b in budgets],
                            "max_regression": threshold, "baseline": None if baseline is None else str(baseline), "compared": compared}  # fmt: skip
    problems = prof.validate(report)
    if problems:  # our own bug, not the user's: say which field
        raise RuntimeError(f"the report does not match its schema: {problems[0]}")
    _print(report, console)
    if json_path is not None:
        from neodragon_cli.atomic import write_json

        write_json(json_path, report)
        console.print(f"wrote {json_path}", highlight=False)
    if png is not None:
        prof.plot(report, png)
        console.print(f"wrote {png}", highlight=False)
    if violations:
        raise prof.BudgetExceeded(f"{len(violations)} check(s) failed: " + "; ".join(violations))


def _analytic_components(target, settings):
    """(Components, resolved settings) for the analytic model of a model folder or a real size."""
    from neodragon_cli.pipelines.deploy import analytic

    if target.kind == "real-size":
        from neodragon_cli.pipelines.flow.settings import GenerationSettings

        from neodragon_cli import recipes

        parts = analytic.real_size_components(target.name)
        recipe = "neodragon/hybrid" if target.name == "real:neodragon" else "pyramid_flow/384p"
        defaults = recipes.load(recipe, command="generate").sampling
        extra = GenerationSettings(sr=True) if target.name == "real:neodragon" else GenerationSettings()
        merged = defaults
        for layer in (extra, settings):
            merged = layer.over(merged)
        return parts, merged.resolved()
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline

    pipe = VideoPipeline.from_pretrained(target.path, safety_checker=False)
    return analytic.Components.from_pipeline(pipe), pipe.settings(settings)


def _analytic_block(parts, resolved, say) -> dict:
    from neodragon_cli.pipelines.deploy import analytic

    say("counting FLOPs per module on the meta device")
    modules, calls = analytic.pipeline_flops(parts, resolved)
    latents = parts.latent_frames(resolved.frames)
    return {
        "figures": analytic.paper_figures(latents),
        "dot_products": analytic.schedule_dot_products(calls, latents),
        "flops": {m.name: m.as_dict() for m in modules},
        "predicted": None,
    }


def _analytic_only(target, settings, say) -> dict:
    from neodragon_cli.pipelines.deploy import profile as prof

    if target.kind in ("export", "quantized"):
        from neodragon_cli.errors import UsageError

        raise UsageError("--analytic alone needs a model folder or a real size; an artifact's FLOPs come with a runtime", hint="add --runtime onnx")
    parts, resolved = _analytic_components(target, settings)
    return {
        "format": prof.FORMAT, "created": _now(), "target": {"path": str(target.path), "kind": target.kind, "name": target.name},
        "runtime": "none", "device": "none (analytic)", "latency_meaningful": False, "environment": prof.environment(),
        "settings": {k: v for k, v in resolved.as_dict().items() if k not in ("prompt_modifier", "negative_prompt")},
        "runs": 0, "load_seconds": None, "end_to_end": None, "modules": {}, "analytic": _analytic_block(parts, resolved, say),
        "checks": None, "notes": [],
    }  # fmt: skip


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _analytic_for(target, report, settings, say) -> dict:
    """The compute model for a measured report, with per-module FLOPs and the predicted times."""
    from neodragon_cli.pipelines.deploy import analytic

    if target.kind in ("model", "real-size"):
        parts, resolved = _analytic_components(target, settings)
        block = _analytic_block(parts, resolved, say)
        flops = {}
        for name, entry in block["flops"].items():  # per call, as the measured latency
            flops[name] = entry["flops"] / max(entry["calls"], 1)
        if "decoder" in report["modules"]:
            flops["decoder"] = block["flops"]["decoder"]["flops"] / max(block["flops"]["decoder"]["calls"], 1)
    else:
        from neodragon_cli.pipelines.deploy.runtime import read_manifest

        manifest = read_manifest(target.path)
        say("counting MatMul / Conv FLOPs of every graph")
        flops = {name: analytic.onnx_graph_flops(target.path / manifest["graphs"][name]["file"]) for name in report["modules"]}
        block = {"figures": analytic.paper_figures(manifest["latent_frames"]), "dot_products": None,
                 "flops": {n: {"flops_per_call": f} for n, f in flops.items()}, "predicted": None}  # fmt: skip
    measured = {n: e["latency_ms"]["median"] for n, e in report["modules"].items() if e["latency_ms"]["median"] is not None}
    if target.kind in ("model", "real-size") and "mmdit_stage0" in flops:
        # the measured stage call is the longest history: predict that call, not the stage's average
        for name, entry in block["flops"].items():
            if name.startswith("mmdit_stage"):
                flops[name] = entry["per_call_max"]
    block["predicted"] = analytic.predict_times(flops, measured)
    return block


def _real_size(target, settings, runs, dtype, modules, say) -> dict:
    from neodragon_cli.pipelines.deploy import profile as prof

    _, resolved = _analytic_components(target, settings)
    names = [m.strip() for m in modules.split(",") if m.strip()] if modules else None
    records = prof.profile_real_size(target.name, settings=resolved, runs=runs, dtype=dtype, modules=names, progress=say)
    return {
        "format": prof.FORMAT, "created": _now(), "target": {"path": str(target.path), "kind": target.kind, "name": target.name},
        "runtime": "torch", "device": f"cpu ({dtype})", "latency_meaningful": True, "environment": prof.environment(),
        "settings": {k: v for k, v in resolved.as_dict().items() if k not in ("prompt_modifier", "negative_prompt")},
        "runs": runs, "load_seconds": None, "end_to_end": None, "modules": {r.name: r.as_dict() for r in records}, "analytic": None,
        "checks": None, "notes": ["published sizes with random weights, one module resident at a time; no end-to-end run"],
    }  # fmt: skip


def _aihub(target, settings, device, seed, say) -> dict:
    import time

    from neodragon_cli.pipelines.deploy import profile as prof
    from neodragon_cli.pipelines.deploy.aihub import profile_on_device
    from neodragon_cli.pipelines.deploy.runtime import read_manifest

    manifest = read_manifest(target.path)
    say("recording every graph's inputs with ONNX Runtime (CPU)")
    _, resolved, _profiler, _seconds, feeds, _load = prof.record_onnx(target.path, [settings], seed=seed)
    records = profile_on_device(target.path, manifest, feeds, device, progress=say)
    return {
        "format": prof.FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": {"path": str(target.path), "kind": target.kind, "name": target.name}, "runtime": "aihub", "device": device,
        "latency_meaningful": True, "environment": prof.environment(),
        "settings": {k: v for k, v in resolved.as_dict().items() if k not in ("prompt_modifier", "negative_prompt")},
        "runs": 1, "load_seconds": None, "end_to_end": None, "modules": {r.name: r.as_dict() for r in records}, "analytic": None,
        "checks": None, "notes": ["per-graph numbers from AI Hub profiling jobs; no end-to-end run on the device"],
    }  # fmt: skip


def _print(report: dict, console) -> None:
    from neodragon_cli.pipelines.deploy import profile as prof
    from rich.table import Table

    if report["modules"]:
        rows = prof.table_rows(report)
        keep = [i for i in range(len(prof.TABLE_HEADER)) if any(row[i] != "-" for row in rows)]  # drop empty columns
        table = Table(*[prof.TABLE_HEADER[i] for i in keep], title=f"{report['target']['name']}: {report['runtime']} on "
                      f"{report['device']} ({report['runs']} runs per module)")  # fmt: skip
        for row in rows:
            table.add_row(*[row[i] for i in keep])
        console.print(table)
    e2e = report.get("end_to_end")
    if e2e:
        console.print(f"end to end: {e2e['seconds']:.2f} s (load {report['load_seconds']:.2f} s apart); peak RSS {e2e.get('peak_rss_mb') or 0:.0f} MB",
                      highlight=False)  # fmt: skip
    block = report.get("analytic")
    if block:
        f = block["figures"]
        console.print(
            f"compute model (t = {f['latent_frames']} latent frames): causal 2t/(t+1) = {f['causal_speedup']:.2f}x "
            f"(limit 2x); temporally-pyramidal causal {f['pyramidal_causal_speedup']:.2f}x (limit {f['pyramidal_causal_speedup_limit']:.0f}x, "
            f"k = {f['history_compression_k']}); spatial pyramid {f['spatial_pyramid_factor']:.2f}x; combined {f['combined_speedup']:.1f}x "
            f"(limit {f['combined_speedup_limit']:.1f}x)", highlight=False,
        )  # fmt: skip
        if block.get("dot_products"):
            d = block["dot_products"]
            console.print(f"as run: {d['as_run']:.3g} attention dot products vs {d['bidirectional_full_resolution']:.3g} bidirectional "
                          f"at full resolution ({d['speedup']:.2f}x)", highlight=False)  # fmt: skip
        flops = Table("module", "calls/video", "GFLOP/video", "attention GFLOP", "GFLOP/call (max)", title="FLOPs per module")
        for name, e in block["flops"].items():
            if "flops" in e:
                flops.add_row(name, str(e["calls"]), f"{e['flops'] / 1e9:.2f}", f"{e['attention_flops'] / 1e9:.2f}", f"{e['per_call_max'] / 1e9:.3f}")
            else:
                flops.add_row(name, "-", "-", "-", f"{e['flops_per_call'] / 1e9:.3f}")
        console.print(flops)
        predicted = block.get("predicted") or {}
        if predicted.get("gflops_per_s"):
            console.print(f"fitted throughput {predicted['gflops_per_s']:.1f} GFLOP/s; measured / predicted: "
                          + ", ".join(f"{n} {m['measured_over_predicted']:.2f}" for n, m in predicted["modules"].items()), highlight=False)  # fmt: skip
    for note in report.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    checks = report.get("checks")
    if checks:
        console.print("checks passed" if checks["passed"] else "[bold red]checks failed:[/] " + "; ".join(checks["violations"]), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
