"""The chain's report: `OUT/report.md` and `OUT/report.json`, the Shapes analogue of the Neodragon paper's
tables for one `neodragon run`, written from what the steps recorded (nothing is run again).

Sources, per step of `OUT/run.json` (in its order; a step's folder is `OUT/NN-NAME/`):

* an optimisation step (distill-te, distill-decoder, prune, step-distill, export, quantize): its artifact's
  `state.json` (the operation's results), `metrics.jsonl` (held-out text-path errors, the pruning stages'
  last losses) and, for quantize, `quantize.json`;
* an eval step: `eval.json` (scores per dimension, seconds and MMDiT calls per video, PSNR / SSIM to its
  reference); it evaluates the artifact before it;
* a profile step: `profile.json` (per-module latency and memory) of the artifact before it.

Parameters are counted from the safetensors headers of each artifact's pipeline folder (no model is
loaded; persistent buffers such as the MMDiT's sin-cos position table left out): the text path is the T5-family
encoder (`text_encoder_3`) plus its head (the ContextAdapter, or the MMDiT's context embedder where there is
none), as the paper's Table 2 and `distill-te` count it; the MMDiT is all its parameters, as the paper's
1.518 B and `prune` count them (a context embedder it keeps is in both); the decoder is the VAE's `decoder.*`
and `post_quant_conv.*`, as `distill-decoder` counts it. An exported or quantized pipeline (ONNX graphs) has
the parameters of the model it was exported from.

Stages, as the paper's Table 8: the teacher (the chain's model), then one per optimisation step. A stage's
scores come from the eval steps between it and the next optimisation step; a step that has not run (a
`--until` run, a stopped one) reads "not run yet", a stage with no eval step after it "—".
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neodragon_cli.errors import ArtifactError, UsageError

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
REPORT_FORMAT = "neodragon-chain-report/1"
NOT_RUN = "not run yet"
NONE = "—"
DONE = ("ran", "cached")
STAGE_NAMES = {
    "distill-te": "+ text path",
    "distill-decoder": "+ decoder",
    "prune": "+ pruning",
    "step-distill": "+ step distillation",
    "export": "+ export",
    "quantize": "+ quantization",
}
DIMENSIONS = ("colour", "shape", "size", "motion", "count", "background", "relation")
PROXIES = ("flicker", "background_stability", "area_stability", "sharpness")
# Persistent buffers saved beside the parameters, left out of the counts: the MMDiT's fixed sin-cos position table.
BUFFERS = ("pos_embed.pos_embed",)


# ----------------------------------------------------------------------------- reading OUT


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing, but run.json records its step as finished",
                            hint="run the chain again (the step reruns) or with --from that step") from None  # fmt: skip
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} cannot be read: {exc}") from None


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def safetensors_parameters(path: Path) -> dict[str, int]:
    """{tensor name: element count} from a safetensors file's header alone."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _folder_parameters(folder: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for path in sorted(folder.rglob("*.safetensors")):
        found.update({f"{path.relative_to(folder)}:{k}": v for k, v in safetensors_parameters(path).items()})
    return found


def pipeline_parameters(folder: Path) -> dict[str, int | None] | None:
    """Text path (encoder + head), MMDiT and decoder parameters of a pipeline folder in our layout
    (pipeline.json), counted from safetensors headers; None for another layout."""
    spec_path = folder / "pipeline.json"
    if not spec_path.is_file():
        return None
    roles = {role: folder / entry["path"] for role, entry in json.loads(spec_path.read_text())["components"].items()}
    counts: dict[str, int | None] = {"text_encoder": None, "text_head": None, "text_path": None, "mmdit": None, "decoder": None}
    mmdit = _folder_parameters(roles["mmdit"]) if "mmdit" in roles else {}
    mmdit = {k: v for k, v in mmdit.items() if k.split(":", 1)[1] not in BUFFERS}
    embedder = sum(v for k, v in mmdit.items() if k.split(":", 1)[1].startswith("context_embedder."))
    if mmdit:
        counts["mmdit"] = sum(mmdit.values())
    if "text_encoder" in roles:
        t5 = roles["text_encoder"] / "text_encoder_3"
        counts["text_encoder"] = sum(_folder_parameters(t5 if t5.is_dir() else roles["text_encoder"]).values())
    if "context_adapter" in roles:
        counts["text_head"] = sum(_folder_parameters(roles["context_adapter"]).values())
    elif embedder:
        counts["text_head"] = embedder
    if counts["text_encoder"] is not None and counts["text_head"] is not None:
        counts["text_path"] = counts["text_encoder"] + counts["text_head"]
    if "vae" in roles:
        vae = _folder_parameters(roles["vae"])
        counts["decoder"] = sum(v for k, v in vae.items() if k.split(":", 1)[1].startswith(("decoder.", "post_quant_conv."))) or None
    return counts


@dataclass
class Step:
    """One step of the run as run.json records it, and what its folder holds."""

    index: int
    name: str
    command: str
    state: str
    folder: Path
    record: dict
    artifact: Path | None = None

    @property
    def done(self) -> bool:
        return self.state in DONE

    @property
    def status(self) -> str:
        if self.done:
            return "ran" if self.state == "ran" else "cached"
        if self.state == "failed":
            return f"failed: {self.record.get('error') or 'see run.json'}"
        if self.state in ("stopped", "running"):
            return "stopped before the end (run the chain again to continue)"
        return NOT_RUN

    def json(self, name: str) -> Any:
        return _read_json(self.folder / name)

    def operation(self) -> dict:
        """The results the artifact's own operation recorded (its state.json)."""
        return _read_json(self.artifact / "state.json")["operations"][-1]["results"]


@dataclass
class Stage:
    label: str
    step: Step | None  # None: the teacher (the chain's model)
    model: Path | None  # the pipeline folder whose weights the stage has (None: not there)
    evals: list[Step] = field(default_factory=list)
    profiles: list[Step] = field(default_factory=list)
    params: dict[str, int | None] | None = None
    params_note: str | None = None
    params_from: str | None = None  # the stage whose weights these are, when not this one's

    @property
    def done(self) -> bool:
        return self.step is None or self.step.done

    @property
    def name(self) -> str:
        return "teacher" if self.step is None else self.step.name


def _report_step(command: str) -> bool:
    from neodragon_cli.pipelines.chain import STEP_KINDS

    kind = STEP_KINDS.get(command)
    return kind is not None and kind.operation is None


def read_run(out: Path) -> tuple[dict, list[Step], list[Stage]]:
    """run.json, its steps and the stages they make (see the module docstring)."""
    from neodragon_cli.pipelines.chain import RUN_FILE

    path = out / RUN_FILE
    if not path.is_file():
        raise UsageError(f"{out} holds no {RUN_FILE}: the chain has not run there", hint="run the chain first (without --report)")
    run = _read_json(path)
    steps = []
    for i, entry in enumerate(run["steps"]):
        folder = out / f"{i + 1:02d}-{entry['name']}"
        artifact = out / entry["artifact"] if entry.get("artifact") else None
        steps.append(Step(i, entry["name"], entry["command"], entry["state"], folder, entry, artifact))
    model = Path(run["model"])
    stages = [Stage("teacher", None, model if model.is_dir() else None)]
    for step in steps:
        if _report_step(step.command):
            (stages[-1].evals if step.command == "eval" else stages[-1].profiles).append(step)
            continue
        weights = step.artifact if step.done and step.artifact is not None else None
        stages.append(Stage(STAGE_NAMES.get(step.command, f"+ {step.command}"), step, weights))
    for k, stage in enumerate(stages):
        if not stage.done or stage.model is None:
            continue
        stage.params = pipeline_parameters(stage.model)
        if stage.params is None and k > 0 and stages[k - 1].params is not None:  # ONNX graphs of the previous stage's weights
            stage.params, stage.params_from = stages[k - 1].params, stages[k - 1].params_from or stages[k - 1].name
            stage.params_note = f"the parameters of {stage.params_from}'s weights, which its graphs hold"
    if stages[0].model is None:
        stages[0].params_note = f"the model folder {model} is not there any more: its parameters are not counted"
    return run, steps, stages


# ----------------------------------------------------------------------------- collecting


def _eval_summary(step: Step) -> dict:
    report = step.json("eval.json")
    summary = dict(report["summary"])
    summary.update(step=step.name, reference=report.get("reference"), seed=report.get("seed"), num_samples=report.get("num_samples"),
                   prompts=report.get("prompts"))  # fmt: skip
    return summary


def _evals(stage: Stage) -> list[dict]:
    """Per eval step of the stage: its summary, or its state when it has not run."""
    return [_eval_summary(e) if e.done else {"step": e.name, "state": e.status} for e in stage.evals]


def summary_rows(stages: list[Stage]) -> list[dict]:
    """Table 8: one row per stage and eval step after it (one row when there is none)."""
    rows = []
    for stage in stages:
        base: dict[str, Any] = {"stage": stage.label, "step": stage.name, "state": "model" if stage.step is None else stage.step.status}
        params = stage.params or {}
        for key in ("text_path", "mmdit", "decoder"):
            base[f"params_{key}"] = params.get(key) if stage.done else NOT_RUN
        base["params_note"] = stage.params_note
        evals = _evals(stage) if stage.done else [{"step": e.name, "state": NOT_RUN} for e in stage.evals]
        if not evals:
            rows.append({**base, "eval": None, **{k: (None if stage.done else NOT_RUN) for k in _EVAL_KEYS}})
        for summary in evals:
            state = summary.get("state")
            rows.append({**base, "eval": summary["step"], **{k: state if state else summary.get(k) for k in _EVAL_KEYS}})
    return rows


_EVAL_KEYS = ("nfe_per_video", "mmdit_calls_per_video", "seconds_per_video", "runtime", "semantic", "quality", "total", "psnr",
              "ssim", "reference")  # fmt: skip


def _after(stage: Stage) -> dict | None:
    """The first finished eval of a stage (the scores tables 2-6 quote), or None."""
    return next((_eval_summary(e) for e in stage.evals if e.done), None)


def _last(lines: list[dict], **match: Any) -> dict | None:
    found = [line for line in lines if all(line.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def table2(stages: list[Stage]) -> dict:
    rows = []
    for stage in stages:
        if stage.step is not None and stage.step.command != "distill-te":
            continue
        row: dict[str, Any] = {"stage": stage.name, "state": "model" if stage.step is None else stage.step.status}
        if stage.step is None:
            if not any(s.step is not None and s.step.command == "distill-te" for s in stages):
                continue
            params = stage.params or {}
            row.update(mode="teacher", params_text_encoder=params.get("text_encoder"), params_head=params.get("text_head"),
                       params_text_path=params.get("text_path"))  # fmt: skip
        elif stage.done:
            results = stage.step.operation()
            heldout = _last(_metrics(stage.step.artifact / "metrics.jsonl"), split="heldout") or {}
            row.update(mode=results.get("mode"), steps=results.get("steps"), train_prompts=results.get("train_prompts"),
                       params_text_encoder=results.get("params_text_encoder"), params_head=results.get("params_head"),
                       params_text_path=results.get("params_text_path"), heldout_prompts=heldout.get("heldout_prompts"),
                       heldout_mse=heldout.get("heldout_mse"), heldout_cosine=heldout.get("heldout_cosine"))  # fmt: skip
        row["eval"] = _after(stage) if stage.done else None
        rows.append(row)
    return {"rows": rows}


def table3(stages: list[Stage]) -> dict:
    rows = []
    for k, stage in enumerate(stages):
        if stage.step is None or stage.step.command != "distill-decoder":
            continue
        row: dict[str, Any] = {"stage": stage.name, "state": stage.step.status}
        if stage.done:
            r = stage.step.operation()
            recon = r.get("reconstruction") or {}
            row.update(family=r.get("family"), steps=r.get("steps"), perceptual_loss=r.get("perceptual_loss"),
                       params_decoder=r.get("params_decoder"), params_parent_decoder=r.get("params_parent_decoder"),
                       reconstruction={key: recon.get(key) for key in ("psnr", "ssim", "semantic", "quality")} if recon else None,
                       first_frame={key: recon["first_frame"].get(key) for key in ("psnr", "ssim")} if recon.get("first_frame") else None,
                       parent_eval=_after(stages[k - 1]) if stages[k - 1].done else None, eval=_after(stage))  # fmt: skip
        rows.append(row)
    return {"rows": rows}


def table4_5(stages: list[Stage]) -> dict:
    rows = []
    for stage in stages:
        if stage.step is None or stage.step.command != "prune":
            continue
        row: dict[str, Any] = {"stage": stage.name, "state": stage.step.status}
        if stage.done:
            r = stage.step.operation()
            lines = _metrics(stage.step.artifact / "metrics.jsonl")
            row.update({key: r.get(key) for key in ("policy", "removed_blocks", "kept_blocks", "num_layers", "params", "stage1_steps",
                                                     "stage2_steps", "mapping", "stage2_weights")})  # fmt: skip
            for s in (1, 2):
                last = _last(lines, stage=s)
                row[f"stage{s}_last"] = None if last is None else {k: v for k, v in last.items()
                                                                   if k not in ("stage", "lr", "it_s", "elapsed_s", "grad_norm")}  # fmt: skip
            row["eval"] = _after(stage)
        rows.append(row)
    return {"rows": rows}


def table6(stages: list[Stage]) -> dict:
    rows = []
    for k, stage in enumerate(stages):
        if stage.step is None or stage.step.command != "step-distill":
            continue
        row: dict[str, Any] = {"stage": stage.name, "state": stage.step.status}
        if stage.done:
            r = stage.step.operation()
            row.update({key: r.get(key) for key in ("method", "schedule", "steps", "teacher_guidance", "teacher_steps", "nfe_per_video")})
            row.update(teacher=stages[k - 1].name, teacher_eval=_after(stages[k - 1]) if stages[k - 1].done else None, eval=_after(stage))
        rows.append(row)
    return {"rows": rows}


def table7(stages: list[Stage]) -> dict:
    rows = []
    for stage in stages:
        for step in stage.profiles:
            row: dict[str, Any] = {"step": step.name, "stage": stage.name, "state": step.status}
            if step.done:
                p = step.json("profile.json")
                settings = p.get("settings") or {}
                row.update(runtime=p["runtime"], device=p["device"], target=p["target"]["kind"], runs=p["runs"],
                           latency_meaningful=p["latency_meaningful"],
                           settings={k: settings.get(k) for k in ("mode", "first_steps", "video_steps", "frames", "height", "width")},
                           end_to_end=None if p["end_to_end"] is None else {k: p["end_to_end"].get(k) for k in ("seconds", "peak_rss_mb")},
                           modules={name: {"calls_per_video": m["calls_per_video"], "min_ms": m["latency_ms"]["min"],
                                           "median_ms": m["latency_ms"]["median"], "video_ms": m["video_ms"], "weights_mb": m["weights_mb"],
                                           "working_mb": m["working_mb"], "peak_mb": m["peak_mb"]} for name, m in p["modules"].items()})  # fmt: skip
            rows.append(row)
    return {"rows": rows}


def table9(stages: list[Stage]) -> dict:
    rows = []
    for stage in stages:
        if stage.step is None or stage.step.command != "quantize":
            continue
        row: dict[str, Any] = {"stage": stage.name, "state": stage.step.status}
        if stage.done:
            q = _read_json(stage.step.artifact / "quantize.json")
            row.update(backend=q.get("backend"), calibration_videos=q["calibration"]["videos"], heldout_videos=q["heldout"]["videos"],
                       end_to_end=q["end_to_end"],
                       graphs={name: {"scheme": e["scheme"], "adaround": bool(e.get("adaround")), "calibration": e.get("calibration"),
                                      "heldout_samples": e.get("heldout_samples"), "sqnr_db": e.get("sqnr_db"),
                                      "sqnr_source": e.get("sqnr_source")} for name, e in q["graphs"].items()},
                       eval=_after(stage))  # fmt: skip
        rows.append(row)
    return {"rows": rows}


def export_table(stages: list[Stage]) -> dict:
    rows = []
    for stage in stages:
        if stage.step is None or stage.step.command != "export":
            continue
        row: dict[str, Any] = {"stage": stage.name, "state": stage.step.status}
        if stage.done:
            r = stage.step.operation()
            row.update({key: r.get(key) for key in ("graphs", "geometry", "opset", "worst_sqnr_db")})
        rows.append(row)
    return {"rows": rows}


def build_report(out: Path) -> dict:
    """The report's content (what report.json holds) from OUT; raises UsageError without run.json and
    ArtifactError when a file a finished step wrote is missing."""
    run, steps, stages = read_run(out)
    evaluations = []
    for stage in stages:
        for step in stage.evals:
            entry = _eval_summary(step) if step.done and stage.done else {"step": step.name, "state": step.status}
            evaluations.append({"stage": stage.label, **entry})
    return {
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "chain": run["chain"],
        "chain_sha256": run["chain_sha256"],
        "model": run["model"],
        "run": {"status": run["status"], "started": run["started"], "wall_s": run["wall_s"]},
        "steps": [{"name": s.name, "command": s.command, "state": s.state, "status": s.status, "wall_s": s.record.get("wall_s")} for s in steps],
        "summary": summary_rows(stages),
        "evaluations": evaluations,
        "tables": {"table2": table2(stages), "table3": table3(stages), "tables4_5": table4_5(stages), "table6": table6(stages),
                   "table7": table7(stages), "table9": table9(stages), "export": export_table(stages)},  # fmt: skip
    }


# ----------------------------------------------------------------------------- markdown


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return NONE
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return {"score": f"{value:.3f}", "s": f"{value:.2f}", "db": f"{value:.1f}", "ms": f"{value:.1f}", "mb": f"{value:.1f}",
                "calls": f"{value:g}"}.get(kind, f"{value:.4g}")  # fmt: skip
    if isinstance(value, list):
        return "-".join(map(str, value)) if all(isinstance(v, int) for v in value) else ", ".join(map(str, value))
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    padded = [row + [NONE] * (len(headers) - len(row)) for row in rows]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in padded]
    return "\n".join(lines)


def _eval_cells(summary: dict | None, keys: tuple[str, ...] = ("semantic", "quality", "total")) -> list[str]:
    if summary is None:
        return [NONE] * len(keys)
    return [_fmt(summary.get(k), "score") for k in keys]


def _vs_reference(summary: dict | None) -> str:
    if summary is None or summary.get("reference") is None:
        return NONE
    psnr, ssim = summary.get("psnr"), summary.get("ssim")
    psnr_text = "identical" if psnr is None and ssim is not None and ssim >= 1.0 else f"{_fmt(psnr, 'db')} dB"
    return f"{psnr_text} / {_fmt(ssim, 'score')} ({summary['reference']})"


def _missing(rows: list[dict], what: str) -> str | None:
    return f"The chain has no {what} step." if not rows else None


def markdown(report: dict) -> str:
    tables = report["tables"]
    chain = report["chain"]
    shipped = _shipped_name(chain)
    out: list[str] = [
        f"# Chain report: {shipped or Path(chain).name}",
        "",
        f"Run {report['run']['status']} ({report['run']['started']}, {report['run']['wall_s']:.0f} s); report written "
        f"{report['created']} from the files in this folder (`neodragon run {shipped or Path(chain).name} -o OUT --report` writes it again).",
        "Every number below is one the run recorded; — : the chain has no step that measures it; "
        f"\"{NOT_RUN}\": its step has not run.",
        "",
        "## Steps",
        "",
        _table(["#", "step", "command", "state", "wall s"],
               [[str(i + 1), s["name"], s["command"], s["status"], _fmt(s["wall_s"], "s")] for i, s in enumerate(report["steps"])]),
        "",
        "## Tables 1 and 8: the chain stage by stage",
        "",
        "Parameters: text path = T5-family encoder + ContextAdapter (or the MMDiT's context embedder where there is no adapter); "
        "MMDiT = all its parameters (a context embedder it keeps counts in both); decoder with its post-quant conv. "
        "NFE: MMDiT evaluations per video, both CFG passes counted "
        "(from the schedule); MMDiT calls: measured per video; CPU s: generation time per video (loading excluded) on "
        "this machine's CPU.",
        "",
    ]  # fmt: skip
    rows = []
    for r in report["summary"]:
        stage = r["stage"] + (f" ({r['step']})" if r["stage"] != "teacher" else "")
        params = [_fmt(r[f"params_{k}"]) + ("*" if r["params_note"] else "") for k in ("text_path", "mmdit", "decoder")]
        rows.append([stage, *params, _fmt(r["nfe_per_video"], "calls"), _fmt(r["mmdit_calls_per_video"], "calls"),
                     _fmt(r["seconds_per_video"], "s"), _fmt(r["semantic"], "score"), _fmt(r["quality"], "score"),
                     _fmt(r["total"], "score"), r["eval"] or NONE])  # fmt: skip
    out.append(_table(["stage", "text path (TE + CA)", "MMDiT", "decoder", "NFE / video", "MMDiT calls / video", "CPU s / video",
                       "Semantic", "Quality", "Total", "eval step"], rows))  # fmt: skip
    notes = sorted({f"\\* {r['stage']}: {r['params_note']}." for r in report["summary"] if r["params_note"]})
    out += ["", *notes] if notes else []

    out += ["", "## Evaluations", ""]
    if report["evaluations"]:
        rows = []
        for e in report["evaluations"]:
            if "state" in e:
                rows.append([e["step"], e["stage"], e["state"]])
                continue
            rows.append([e["step"], e["stage"], _fmt(e.get("videos")), _fmt(e.get("runtime")), _fmt(e.get("seconds_per_video"), "s"),
                         *_eval_cells(e, ("semantic", "quality", "total", *DIMENSIONS, *PROXIES)), _vs_reference(e)])  # fmt: skip
        out.append(_table(["eval step", "stage", "videos", "runtime", "s / video", "Semantic", "Quality", "Total", *DIMENSIONS,
                           *PROXIES, "PSNR / SSIM to reference"], rows))  # fmt: skip
    else:
        out.append("The chain has no eval step.")

    out += ["", "## Table 2: text path", ""]
    rows = []
    for r in tables["table2"]["rows"]:
        if "mode" not in r:
            rows.append([r["stage"], r["state"]])
            continue
        ev = r.get("eval")
        rows.append([r["stage"], _fmt(r["mode"]), _fmt(r.get("params_text_encoder")), _fmt(r.get("params_head")), _fmt(r.get("params_text_path")),
                     _fmt(r.get("heldout_mse")), _fmt(r.get("heldout_cosine"), "score"), *_eval_cells(ev),
                     *_eval_cells(ev, ("colour", "shape", "size", "motion")), _vs_reference(ev)])  # fmt: skip
    out.append(_missing(rows, "distill-te") or _table(
        ["text path", "mode", "encoder", "head (CA / CE)", "TE + CA", "held-out MSE", "held-out cos", "Semantic", "Quality", "Total",
         "colour", "shape", "size", "motion", "PSNR / SSIM to reference"], rows))  # fmt: skip

    out += ["", "## Table 3: decoder", ""]
    rows = []
    for r in tables["table3"]["rows"]:
        if "family" not in r:
            rows.append([r["stage"], r["state"]])
            continue
        rec, first = r.get("reconstruction") or {}, r.get("first_frame") or {}
        ev, before = r.get("eval"), r.get("parent_eval")
        rows.append([r["stage"], _fmt(r["family"]), _fmt(r["params_parent_decoder"]), _fmt(r["params_decoder"]), _fmt(r["steps"]),
                     f"{_fmt(rec.get('psnr'), 'db')} / {_fmt(rec.get('ssim'), 'score')}", f"{_fmt(first.get('psnr'), 'db')} / {_fmt(first.get('ssim'), 'score')}",
                     f"{_fmt(rec.get('semantic'), 'score')} / {_fmt(rec.get('quality'), 'score')}",
                     f"{_fmt((before or {}).get('total'), 'score')} → {_fmt((ev or {}).get('total'), 'score')}", _vs_reference(ev),
                     _fmt(r["perceptual_loss"])])  # fmt: skip
    out.append(_missing(rows, "distill-decoder") or _table(
        ["step", "family", "parent decoder params", "decoder params", "steps", "reconstruction PSNR dB / SSIM", "first frame PSNR / SSIM",
         "reconstruction judge Semantic / Quality", "Total before → after", "PSNR / SSIM to reference", "perceptual term"], rows))  # fmt: skip

    out += ["", "## Tables 4 and 5: pruning", ""]
    rows = []
    for r in tables["tables4_5"]["rows"]:
        if "policy" not in r:
            rows.append([r["stage"], r["state"]])
            continue
        losses = []
        for s in (1, 2):
            last = r.get(f"stage{s}_last")
            losses.append(NONE if last is None else ", ".join(f"{k} {_fmt(v)}" for k, v in last.items() if k != "step"))
        rows.append([r["stage"], _fmt(r["policy"]), _fmt(r["removed_blocks"]), f"{r['num_layers'][0]} → {r['num_layers'][1]}",
                     f"{_fmt(r['params'][0])} → {_fmt(r['params'][1])}", f"{r['stage1_steps']} steps: {losses[0]}",
                     f"{r['stage2_steps']} steps ({r['mapping']}): {losses[1]}", *_eval_cells(r.get("eval"), ("total",)),
                     _vs_reference(r.get("eval"))])  # fmt: skip
    out.append(_missing(rows, "prune") or _table(
        ["step", "policy", "removed blocks", "blocks", "MMDiT params", "Stage 1 (last logged losses)", "Stage 2 (last logged losses)",
         "Total after", "PSNR / SSIM to reference"], rows))  # fmt: skip

    out += ["", "## Table 6: step distillation", ""]
    rows = []
    for r in tables["table6"]["rows"]:
        if "method" not in r:
            rows.append([r["stage"], r["state"]])
            continue
        before, after = r.get("teacher_eval"), r.get("eval")
        nfe = r.get("nfe_per_video") or {}
        rows.append([r["stage"], _fmt(r["method"]), _fmt(r["schedule"]), _fmt(r["steps"]), f"{_fmt(nfe.get('teacher'))} → {_fmt(nfe.get('student'))}",
                     f"{_fmt((before or {}).get('mmdit_calls_per_video'), 'calls')} → {_fmt((after or {}).get('mmdit_calls_per_video'), 'calls')}",
                     f"{_fmt((before or {}).get('seconds_per_video'), 's')} → {_fmt((after or {}).get('seconds_per_video'), 's')}",
                     *(f"{_fmt((before or {}).get(k), 'score')} → {_fmt((after or {}).get(k), 'score')}" for k in ("semantic", "quality", "total"))])  # fmt: skip
    out.append(_missing(rows, "step-distill") or _table(
        ["step", "method", "schedule", "steps", "NFE teacher → student", "MMDiT calls measured", "CPU s / video", "Semantic", "Quality",
         "Total"], rows))  # fmt: skip
    if rows:
        out += ["", "Before → after: the eval of the stage step distillation starts from, and the eval after it."]

    out += ["", "## Table 7: latency and memory per module", ""]
    profiles = tables["table7"]["rows"]
    if not profiles:
        out.append("The chain has no profile step.")
    for r in profiles:
        if "runtime" not in r:
            out += [f"`{r['step']}` (of {r['stage']}): {r['state']}.", ""]
            continue
        s = r["settings"]
        e2e = r["end_to_end"] or {}
        out += [f"`{r['step']}` profiles {r['stage']} ({r['target']}) with {r['runtime']} on {r['device']}, {r['runs']} timed call(s) per "
                f"module; {s.get('frames')} frames at {s.get('height')}×{s.get('width')}, {s.get('mode')} "
                f"{_fmt(s.get('video_steps'))}. End to end {_fmt(e2e.get('seconds'), 's')} s, peak RSS {_fmt(e2e.get('peak_rss_mb'), 'mb')} MB."
                + ("" if r["latency_meaningful"] else " Latency here is a simulator's and means nothing."), ""]  # fmt: skip
        out.append(_table(["module", "calls / video", "min / median ms", "ms per video", "weights MB", "working MB", "peak MB"],
                          [[name, _fmt(m["calls_per_video"]), f"{_fmt(m['min_ms'], 'ms')} / {_fmt(m['median_ms'], 'ms')}",
                            _fmt(m["video_ms"], "ms"), _fmt(m["weights_mb"], "mb"), _fmt(m["working_mb"], "mb"), _fmt(m["peak_mb"], "mb")]
                           for name, m in r["modules"].items()]))  # fmt: skip
        out.append("")

    out += ["", "## Table 9: quantization", ""]
    quantized = tables["table9"]["rows"]
    if not quantized:
        out.append("The chain has no quantize step.")
    for r in quantized:
        if "graphs" not in r:
            out += [f"`{r['stage']}`: {r['state']}.", ""]
            continue
        e2e = r["end_to_end"]
        e2e_text = (f"SQNR {_fmt(e2e.get('sqnr_db'), 'db')} dB, PSNR {_fmt(e2e.get('psnr_db'), 'db')} dB" if isinstance(e2e, dict) else _fmt(e2e))
        out += [f"`{r['stage']}`: backend {r['backend']}, calibration from {r['calibration_videos']} video(s), held-out inputs from "
                f"{r['heldout_videos']}; the quantized pipeline's held-out video against the float one: {e2e_text}.", ""]  # fmt: skip
        rows = []
        for name, g in r["graphs"].items():
            cal = g["calibration"] or {}
            rows.append([name, g["scheme"], _fmt(g["adaround"]), f"{_fmt(cal.get('used'))} of {_fmt(cal.get('recorded'))} recorded",
                         _fmt(g["heldout_samples"]), _fmt(g["sqnr_db"], "db") if g["sqnr_db"] is not None else f"{NONE} ({g['sqnr_source']})"])  # fmt: skip
        out.append(_table(["graph", "scheme", "AdaRound", "calibration inputs", "held-out inputs", "SQNR dB vs float"], rows))
        ev = r.get("eval")
        if ev is not None:
            out += ["", f"Eval of the quantized pipeline (`{ev['step']}`, {ev.get('runtime')}): Semantic {_fmt(ev.get('semantic'), 'score')}, "
                        f"Quality {_fmt(ev.get('quality'), 'score')}, Total {_fmt(ev.get('total'), 'score')}; PSNR / SSIM to reference "
                        f"{_vs_reference(ev)}."]  # fmt: skip
        out.append("")

    exports = tables["export"]["rows"]
    if exports:
        out += ["", "## Export (static graphs)", ""]
        for r in exports:
            if "graphs" not in r:
                out.append(f"`{r['stage']}`: {r['state']}.")
                continue
            g = r.get("geometry") or {}
            out.append(f"`{r['stage']}`: {len(r['graphs'])} graphs ({', '.join(r['graphs'])}) at {g.get('frames')} frames "
                       f"{g.get('height')}×{g.get('width')}, opset {r['opset']}; worst output SQNR against PyTorch "
                       f"{_fmt(r['worst_sqnr_db'], 'db')} dB.")  # fmt: skip
    return "\n".join(out).rstrip() + "\n"


def _shipped_name(chain: str) -> str | None:
    from neodragon_cli.recipes import shipped_root

    try:
        return str(Path(chain).resolve().relative_to(shipped_root().resolve()).with_suffix(""))
    except ValueError:
        return None


def write_report(out: Path) -> dict:
    """Write OUT/report.json and OUT/report.md from what OUT holds; returns the report."""
    from neodragon_cli.atomic import write_json, write_text

    report = build_report(out)
    write_json(out / REPORT_JSON, report)
    write_text(out / REPORT_MD, markdown(report))
    return report
