"""`quantize`: post-training quantization of an `export` artifact's graphs (paper §4.2, Table 9).

    plan = plan_quantization(manifest, scheme="w8a16", per_module=["fp16=decoder"], adaround="sr")
    result = quantize_export(export_folder, out, plan=plan, ...)     # the artifact; quantize.json

Per graph, a scheme:

    w8a16  int8 weights (per output channel for Conv / Gemm / MatMul weights, i.e. per row of a
           Linear), 16-bit activations: the paper's MMDiT / VAE / QuickSRNet setting
    w8a8   int8 weights and activations
    fp16   the float graph, precision left to the backend (QNN HTP runs float graphs in fp16;
           hand-converting the ONNX to fp16 costs accuracy and speed on the NPU): the paper's text
           encoders and ContextAdapter (a norm-free MLP: W8A16 ruins it)

Backends: `aimet` (aimet-onnx QuantizationSimModel with the HTP v79 per-channel config, min-max
calibration, AdaRound where asked, exported as QDQ ONNX + AIMET encodings JSON) and `ort` (ONNX
Runtime's QNN QDQ tools: qnn_preprocess_model, get_qnn_qdq_config, quantize). `aimet-torch`
(`quantize_aimet_torch.py`: QuantSim and AdaRound on the PyTorch modules rebuilt from the export's
source model, exported as QDQ ONNX) needs aimet-torch, which needs the standard torch build; where it
cannot be imported the command stops before any work.

Calibration inputs are recorded from real generations with the float graphs (`calibration.py`);
evaluation uses inputs recorded from other prompts (held out): per graph the SQNR of the quantized
graph against the float graph on ONNX Runtime's CPU EP, per output and worst, over all held-out
feeds (Table 9); then every graph is loaded on the QNN HTP backend with CPU fallback disabled and its
output compared with the CPU EP's; finally the quantized pipeline generates the held-out prompt with
the held-out seed and its video is compared with the float pipeline's (SQNR, PSNR).

The output folder is a drop-in replacement for the export folder (`export.json` describes the QDQ
graphs; `generate --runtime onnx --model OUT` runs them) plus `quantize.json` and
`<graph>.encodings`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from neodragon_cli.errors import NeodragonError, UsageError
from neodragon_cli.pipelines.deploy import onnx_tools
from neodragon_cli.pipelines.deploy.calibration import Recording, paper_size, pick, recording_settings
from neodragon_cli.pipelines.deploy.export import MANIFEST, MANIFEST_FORMAT

QUANTIZE_FILE = "quantize.json"
QUANTIZE_FORMAT = "neodragon-quantize/1"
SCHEMES = {"w8a16": ("int8", "int16"), "w8a8": ("int8", "int8"), "fp16": None}
BACKENDS = ("aimet", "ort", "aimet-torch")
# graphs the paper keeps in fp16 unless asked otherwise (text encoders, ContextAdapter)
FP16_BY_DEFAULT = ("t5", "clip_*", "context_adapter")
# module groups accepted besides graph names and fnmatch patterns in --per-module / --adaround
GROUPS = {
    "text": ("t5", "clip_*"),
    "text_encoder": ("t5", "clip_*"),
    "mmdit": ("mmdit_*",),
    "decoder": ("decoder_*",),
    "vae": ("vae_encoder", "decoder_*"),
}
DEFAULT_ADAROUND = ("sr",)  # the paper applies AdaRound to QuickSRNet
DEFAULT_ADAROUND_ITERATIONS = 1000


class QnnUnsupportedError(NeodragonError):
    """A quantized graph does not run entirely on the QNN HTP backend: exit 2, naming each node."""

    exit_code = 2


# ------------------------------------------------------------------------------------ the plan


@dataclass
class GraphPlan:
    name: str
    scheme: str
    adaround: bool = False
    calibration: int = 0  # samples asked for


@dataclass
class QuantizationPlan:
    graphs: list[GraphPlan]
    backend: str = "aimet"
    adaround_iterations: int = DEFAULT_ADAROUND_ITERATIONS
    notes: list[str] = field(default_factory=list)

    def quantized(self) -> list[GraphPlan]:
        return [g for g in self.graphs if g.scheme != "fp16"]


def match_modules(spec: str, graphs: list[str], what: str) -> list[str]:
    """The graph names a comma list of graph names, groups (GROUPS) or fnmatch patterns selects;
    UsageError for an item that selects nothing."""
    chosen: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        patterns = GROUPS.get(item, (item,))
        hits = [g for g in graphs if any(fnmatchcase(g, p) for p in patterns)]
        if not hits:
            raise UsageError(f"{what}: '{item}' names no graph of this export",
                             hint=f"graphs: {', '.join(graphs)}; groups: {', '.join(GROUPS)}")  # fmt: skip
        chosen += [h for h in hits if h not in chosen]
    return chosen


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise UsageError(f"unknown scheme '{scheme}'", hint=f"use one of {', '.join(SCHEMES)}")
    return scheme


def plan_quantization(graphs: list[str], *, scheme: str = "w8a16", per_module: list[str] | None = None,
                      adaround: str | None = None, calibration: int | None = None, backend: str = "aimet",
                      adaround_iterations: int = DEFAULT_ADAROUND_ITERATIONS) -> QuantizationPlan:  # fmt: skip
    """Scheme, AdaRound and calibration size per graph. `per_module`: ["SCHEME=MODULES", ...] applied
    in order over the defaults (text encoders and ContextAdapter fp16, the rest `scheme`); `adaround`:
    MODULES, "none", or None for the default (the SR graph when there is one); `calibration`: samples
    per graph (default: the paper's sizes)."""
    check_scheme(scheme)
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}'", hint=f"use one of {', '.join(BACKENDS)}")
    if calibration is not None and calibration < 1:
        raise UsageError(f"--calibration must be at least 1, got {calibration}")
    if adaround_iterations < 1:
        raise UsageError(f"--adaround-iterations must be at least 1, got {adaround_iterations}")
    schemes = {g: "fp16" if any(fnmatchcase(g, p) for p in FP16_BY_DEFAULT) else scheme for g in graphs}
    for entry in per_module or []:
        name, sep, modules = entry.partition("=")
        if not sep or not modules.strip():
            raise UsageError(f"--per-module '{entry}' is not SCHEME=MODULES", hint="e.g. --per-module fp16=decoder_first,decoder_step")
        for graph in match_modules(modules, graphs, "--per-module"):
            schemes[graph] = check_scheme(name.strip())
    notes = []
    if adaround is None:
        rounded = [g for g in graphs if g in DEFAULT_ADAROUND]
        if rounded and backend == "ort":
            notes.append("AdaRound (default: sr) is an AIMET feature; backend ort quantizes sr without it")
            rounded = []
    elif adaround.strip() == "none":
        rounded = []
    else:
        rounded = match_modules(adaround, graphs, "--adaround")
        if backend == "ort":
            raise UsageError("--adaround needs an AIMET backend", hint="use --backend aimet, or leave --adaround out")
        floats = [g for g in rounded if schemes[g] == "fp16"]
        if floats:
            raise UsageError(f"--adaround: {floats[0]} is fp16, AdaRound rounds integer weights", hint="quantize it with --per-module w8a16=...")
    plans = [GraphPlan(g, schemes[g], g in rounded and schemes[g] != "fp16", calibration or paper_size(g)) for g in graphs]
    return QuantizationPlan(plans, backend, adaround_iterations, notes)


# ------------------------------------------------------------------------------------ backends


AIMET_CONFIG = "htp_quantsim_config_v79_per_channel_linear.json"  # per-channel Conv / Gemm / MatMul weights


@contextmanager
def _quiet_aimet(*more: str):
    """AIMET logs every quantizer it adjusts at INFO; keep warnings (of its loggers and `more`)."""
    loggers = [logging.getLogger(name) for name in ("Quant", "Utils", "ConnectedGraph", "BatchNormFolding", *more)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def aimet_quantize(model_path: Path, calibration: list[dict], scheme: str, *, adaround_iterations: int = 0,
                   threads: int = 1):  # fmt: skip
    """aimet-onnx QuantSim of the graph at `model_path`: (QDQ ModelProto, AIMET encodings dict).
    With `adaround_iterations`, AdaRound optimises the weight rounding on `calibration` first."""
    import onnx
    import aimet_onnx
    import aimet_onnx.common.quantsim_config as aimet_configs
    from aimet_onnx.quantsim import QuantizationSimModel

    param_type, activation_type = SCHEMES[scheme]
    config = str(Path(aimet_configs.__file__).parent / AIMET_CONFIG)
    from aimet_onnx.utils import duplicate_shared_initializers

    model = onnx.load(str(model_path))
    with _quiet_aimet(), tempfile.TemporaryDirectory() as scratch:
        duplicate_shared_initializers(model.graph)  # a bias read by two nodes gets a bias scale per node
        sim = QuantizationSimModel(model, param_type=param_type, activation_type=activation_type, config_file=config,
                                   path=scratch, session_options_kwargs={"intra_op_num_threads": threads})  # fmt: skip
        if adaround_iterations:
            aimet_onnx.apply_adaround(sim, calibration, num_iterations=adaround_iterations)
        sim.compute_encodings(calibration)
        qdq = sim.to_onnx_qdq()
        sim.export(scratch, "graph", export_model=False)
        encodings = json.loads((Path(scratch) / "graph.encodings").read_text())
    return qdq, encodings


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def ort_quantize(model_path: Path, calibration: list[dict], scheme: str, *, threads: int = 1):
    """ONNX Runtime's QNN QDQ quantization of `model_path`: (QDQ ModelProto, encodings read off its Q/DQ nodes)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    activation = {"int16": QuantType.QUInt16, "int8": QuantType.QUInt8}[SCHEMES[scheme][1]]
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "pre.onnx"
        if not qnn_preprocess_model(str(model_path), str(source)):
            source = Path(model_path)
        config = get_qnn_qdq_config(str(source), _Reader(calibration), activation_type=activation,
                                    weight_type=QuantType.QUInt8, per_channel=True)  # fmt: skip
        quantize(str(source), str(Path(scratch) / "q.onnx"), config)
        model = onnx.load(str(Path(scratch) / "q.onnx"))
    return model, qdq_encodings(model)


def qdq_encodings(model) -> dict:
    """{"activation_encodings"|"param_encodings": {tensor: {"scale", "offset", "dtype"}}} read off a QDQ
    graph: QuantizeLinear of a weight or an activation, and DequantizeLinear of a pre-quantized weight
    (scale and zero point per tensor or per channel)."""
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {"activation_encodings": {}, "param_encodings": {}}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.input[1] not in constants:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] not in constants:
            continue  # the second half of an activation's Q/DQ pair
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        kind = "param_encodings" if node.input[0] in constants else "activation_encodings"
        name = node.output[0] if node.op_type == "DequantizeLinear" else node.input[0]
        out[kind][name] = {
            "scale": np.atleast_1d(constants[node.input[1]]).astype(float).tolist(),
            "offset": [] if zero is None else np.atleast_1d(zero).astype(int).tolist(),
            "dtype": "int8" if zero is None else str(zero.dtype),
        }
    return out


def check_aimet_torch() -> None:
    """UsageError (exit 2, before any work) where aimet-torch cannot be imported."""
    import importlib

    try:
        importlib.import_module("aimet_torch")  # optional extra: not a declared dependency
    except Exception as exc:  # ImportError, or torchvision failing to load against the CPU torch
        raise UsageError(f"--backend aimet-torch needs aimet-torch, which does not import here ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no message'})",
                         hint="pip install 'neodragon[aimet-torch]' with the standard torch build, or use --backend aimet") from None  # fmt: skip


# ------------------------------------------------------------------------------------ evaluation


def compare_graphs(float_path: Path, quant_path: Path, feeds: list[dict], threads: int = 1) -> dict:
    """Quantized vs float graph on the CPU EP over `feeds`: per output the SQNR over every feed
    together (sum of signal / sum of noise) and the max |diff|; `sqnr_db` is the worst output."""
    reference, test = onnx_tools.session(float_path, threads), onnx_tools.session(quant_path, threads)
    names = [o.name for o in reference.get_outputs()]
    refs, outs = {n: [] for n in names}, {n: [] for n in names}
    for feed in feeds:
        for name, r, q in zip(names, reference.run(None, feed), test.run(None, feed)):
            refs[name].append(torch.from_numpy(np.asarray(r, dtype=np.float32)).flatten())
            outs[name].append(torch.from_numpy(np.asarray(q, dtype=np.float32)).flatten())
    outputs = {}
    for name in names:
        r, q = torch.cat(refs[name]), torch.cat(outs[name])
        outputs[name] = {"sqnr_db": onnx_tools.sqnr_db(r, q), "max_abs_diff": onnx_tools.max_abs_diff(r, q)}
    return {"samples": len(feeds), "outputs": outputs, "sqnr_db": min(o["sqnr_db"] for o in outputs.values())}


def video_metrics(reference: np.ndarray, test: np.ndarray) -> dict:
    """uint8 videos [T, H, W, 3]: SQNR (dB, on pixel values), PSNR (dB, peak 255), mean |diff| in levels."""
    r, t = torch.from_numpy(reference.astype(np.float64)), torch.from_numpy(test.astype(np.float64))
    mse = float((r - t).pow(2).mean())
    return {
        "sqnr_db": onnx_tools.sqnr_db(r, t),
        "psnr_db": onnx_tools.SQNR_CAP_DB if mse == 0 else min(onnx_tools.SQNR_CAP_DB, 10 * math.log10(255**2 / mse)),
        "mean_abs_diff": float((r - t).abs().mean()),
        "frames": int(reference.shape[0]),
    }


# ------------------------------------------------------------------------------------ the artifact


def read_export(folder: Path) -> dict:
    """The export manifest of `folder`; UsageError (exit 2) when it is not an export artifact."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise UsageError(f"export folder does not exist: {folder}", hint="make one with `neodragon export MODEL -o FOLDER`")
    if not path.is_file():
        raise UsageError(f"{folder} is not an export folder (no {MANIFEST})", hint="make one with `neodragon export MODEL -o FOLDER`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UsageError(f"{path}: format {manifest.get('format')!r} is not an export manifest ({MANIFEST_FORMAT})")
    if (Path(folder) / QUANTIZE_FILE).is_file():
        raise UsageError(f"{folder} is already quantized", hint="quantize the float export it was made from")
    return manifest


def _host_files(export: Path, manifest: dict) -> list[Path]:
    """Files of the export besides its graphs and bookkeeping (tokenizers, the position table)."""
    from neodragon_cli.artifacts import METRICS_FILE, RECIPE_FILE, STATE_FILE

    graph_files = {f for entry in manifest["graphs"].values() for f in entry["files"]}
    skipped = graph_files | {MANIFEST, STATE_FILE, RECIPE_FILE, METRICS_FILE}
    return [p for p in sorted(export.rglob("*")) if p.is_file() and p.relative_to(export).as_posix() not in skipped]


@dataclass
class QuantizeSettings:
    threads: int = 1
    heldout_samples: int = 50  # per graph, for the SQNR table
    qnn: bool = True
    qnn_samples: int = 1  # held-out feeds run on the HTP simulator per graph
    qnn_context: bool = False
    htp_arch: str = "79"
    soc_model: str = "69"
    end_to_end: bool = True


def quantize_graphs(export: Path, manifest: dict, plan: QuantizationPlan, calibration: Recording, heldout: Recording,
                    folder: Path, settings: QuantizeSettings, progress: Callable[[str], None] | None = None,
                    modules: dict | None = None) -> dict:  # fmt: skip
    """Quantize every planned graph of `export` into `folder` and evaluate it; {graph: quantize.json entry}.
    Backend aimet-torch: `modules` holds each quantized graph's PyTorch module (`rebuild_modules`)."""
    entries = {}
    for graph in plan.graphs:
        entry_in = manifest["graphs"][graph.name]
        float_path = export / entry_in["file"]
        target = folder / entry_in["file"]
        feeds = calibration.feeds.get(graph.name, [])
        used = pick(feeds, graph.calibration)
        entry = {"scheme": graph.scheme, "component": entry_in["component"]}
        if graph.scheme == "fp16":
            if progress:
                progress(f"{graph.name}: fp16 (float graph; precision left to the backend)")
            for name in entry_in["files"]:
                shutil.copy2(export / name, folder / name)
            entry.update(backend=None, calibration={"asked": 0, "recorded": len(feeds), "used": 0})
        else:
            if progress:
                progress(f"{graph.name}: {graph.scheme} on {len(used)} recorded inputs"
                         + (f" + AdaRound ({plan.adaround_iterations} iterations)" if graph.adaround else ""))  # fmt: skip
            if plan.backend == "ort":
                model, encodings = ort_quantize(float_path, used, graph.scheme, threads=settings.threads)
            elif plan.backend == "aimet-torch":
                from neodragon_cli.pipelines.deploy.quantize_aimet_torch import torch_quantize

                model, encodings = torch_quantize(modules[graph.name], entry_in, used, graph.scheme, threads=settings.threads,
                                                  adaround_iterations=plan.adaround_iterations if graph.adaround else 0)  # fmt: skip
            else:
                model, encodings = aimet_quantize(float_path, used, graph.scheme, threads=settings.threads,
                                                  adaround_iterations=plan.adaround_iterations if graph.adaround else 0)  # fmt: skip
            onnx_tools.save(model, target)
            from neodragon_cli.atomic import write_json

            write_json(folder / f"{graph.name}.encodings", encodings)
            entry.update(backend=plan.backend, adaround={"iterations": plan.adaround_iterations} if graph.adaround else None,
                         calibration={"asked": graph.calibration, "recorded": len(feeds), "used": len(used)},
                         qdq_nodes=sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node),
                         opset=max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))  # fmt: skip
        held = pick(heldout.feeds.get(graph.name, []), settings.heldout_samples)
        entry["cpu"] = compare_graphs(float_path, target, held, settings.threads) if held and graph.scheme != "fp16" else None
        if entry["cpu"] is not None and progress:
            progress(f"{graph.name}: {entry['cpu']['sqnr_db']:.1f} dB vs float on {len(held)} held-out inputs")
        if settings.qnn:
            from neodragon_cli.pipelines.deploy import qnn

            if progress:
                progress(f"{graph.name}: QNN HTP (simulator), CPU fallback disabled")
            context_dir = None
            if settings.qnn_context:
                context_dir = folder / "qnn_context"
                context_dir.mkdir(exist_ok=True)
            check = qnn.htp_check(target, pick(held, settings.qnn_samples), threads=settings.threads, htp_arch=settings.htp_arch,
                                  soc_model=settings.soc_model, context_dir=context_dir)  # fmt: skip
            entry["qnn_htp"] = check.as_dict()
        # the module's SQNR against float: the CPU EP's QDQ simulation, or for fp16 the HTP's fp16 run
        if entry["cpu"] is not None:
            entry["sqnr_db"], entry["sqnr_source"] = entry["cpu"]["sqnr_db"], "QDQ on the CPU EP vs float, held-out inputs"
        elif entry.get("qnn_htp") and entry["qnn_htp"]["sqnr_vs_cpu_db"] is not None:
            entry["sqnr_db"], entry["sqnr_source"] = entry["qnn_htp"]["sqnr_vs_cpu_db"], "QNN HTP fp16 vs float on the CPU EP, held-out inputs"
        else:
            entry["sqnr_db"], entry["sqnr_source"] = None, "fp16 is measured on QNN HTP (not run: --no-qnn)"
        entry["heldout_samples"] = len(held)
        entries[graph.name] = entry
    return entries


def unsupported_report(entries: dict) -> list[str]:
    """'graph: node (Op), ...' for every graph the HTP backend refused."""
    lines = []
    for name, entry in entries.items():
        check = entry.get("qnn_htp")
        if check and not check["loaded"]:
            nodes = ", ".join(f"{n['node']} ({n['op']})" for n in check["unsupported"]) or check["error"]
            lines.append(f"{name}: {nodes}")
    return lines


def write_export_manifest(manifest: dict, entries: dict, folder: Path) -> None:
    """export.json of the quantized folder: the export's, each graph entry describing the file now there."""
    from neodragon_cli.atomic import write_json

    graphs = {}
    for name, entry in manifest["graphs"].items():
        if name not in entries:
            continue
        model = onnx_tools.load(folder / entry["file"])
        files = sorted(p.name for p in folder.glob(f"{name}.onnx*"))
        new = {k: v for k, v in entry.items() if k not in ("validation", "simplified")}
        new.update(files=files, bytes=sum((folder / f).stat().st_size for f in files), graph=onnx_tools.graph_facts(model),
                   precision=entries[name]["scheme"])  # fmt: skip
        graphs[name] = new
    write_json(folder / MANIFEST, {**manifest, "graphs": graphs})


def end_to_end(folder: Path, heldout: Recording, prompt: str, seed: int) -> dict:
    """The quantized pipeline in `folder` (CPU EP) generates `prompt` with `seed`; its video vs the float one."""
    from neodragon_cli.pipelines.deploy.runtime import load_onnx_pipeline

    pipe = load_onnx_pipeline(folder)
    frames = pipe.generate(prompt, recording_settings(pipe), seed=seed).frames
    return {"prompt": prompt, "seed": seed, **video_metrics(heldout.videos[0], frames)}


# ------------------------------------------------------------------------------------ the command


DEFAULT_MAX_VIDEOS = 4
HELDOUT_SEED_OFFSET = 1000


@dataclass
class CalibrationSource:
    """Where the calibration and held-out inputs come from: saved data, or generations from prompts
    (a file: its last prompt is held out; none: Shapes captions, held out from the 'heldout' split)."""

    prompts: Path | None = None
    seed: int = 0
    max_videos: int = DEFAULT_MAX_VIDEOS
    data: Path | None = None  # a folder written by `save`
    save: Path | None = None

    def prompt_lists(self) -> tuple[list[str], list[str]]:
        if self.max_videos < 1:
            raise UsageError(f"--videos must be at least 1, got {self.max_videos}")
        if self.prompts is not None:
            from neodragon_cli.pipelines.distill.prompts import read_prompts

            prompts = read_prompts(self.prompts)
            if len(prompts) < 2:
                raise UsageError(f"{self.prompts} holds {len(prompts)} prompt; quantize needs at least 2",
                                 hint="the last prompt is held out for evaluation, the others calibrate")  # fmt: skip
            return prompts[:-1][: self.max_videos], prompts[-1:]
        from neodragon_cli.pipelines.data.shapes import prompt_corpus

        return prompt_corpus(self.max_videos, self.seed, "train"), prompt_corpus(1, self.seed, "heldout")


def _targets_met(plan: QuantizationPlan) -> Callable[[dict[str, int]], bool]:
    return lambda counts: all(counts.get(g.name, 0) >= g.calibration for g in plan.quantized())


def gather_calibration(export: Path, plan: QuantizationPlan, source: CalibrationSource,
                       progress: Callable[[str, int, int], None] | None = None) -> tuple[Recording, Recording, dict]:  # fmt: skip
    """(calibration, held-out, provenance): loaded from `source.data` or recorded; UsageError when a
    graph to quantize got no calibration input or the saved data is from another export."""
    from neodragon_cli.artifacts import folder_hash
    from neodragon_cli.pipelines.deploy.calibration import load_recording, record_graph_inputs, save_recording

    export_hash = folder_hash(export)
    names = [g.name for g in plan.graphs]
    if source.data is not None:
        if not Path(source.data).is_dir():
            raise UsageError(f"calibration data folder does not exist: {source.data}", hint="record it with --save-calibration DIR")
        calibration, meta = load_recording(Path(source.data) / "calibration")
        heldout, held_meta = load_recording(Path(source.data) / "heldout")
        if meta.get("export_hash") != export_hash:
            raise UsageError(f"the calibration data in {source.data} was recorded from another export",
                             hint="record it again from this export (leave out --calibration-data)")  # fmt: skip
    else:
        prompts, held_prompts = source.prompt_lists()
        step = (lambda label: (lambda done, total: progress(label, done, total))) if progress else (lambda label: None)
        calibration = record_graph_inputs(export, prompts, seed=source.seed, graphs=names, enough=_targets_met(plan),
                                          progress=step("calibration videos"))  # fmt: skip
        heldout_seed = source.seed + HELDOUT_SEED_OFFSET
        heldout = record_graph_inputs(export, held_prompts, seed=heldout_seed, graphs=names, progress=step("held-out video"))
        meta = {"export_hash": export_hash, "prompts": prompts[: len(calibration.videos)], "seed": source.seed}
        held_meta = {"export_hash": export_hash, "prompts": held_prompts, "seed": heldout_seed}
        if source.save is not None:
            save_recording(calibration, Path(source.save) / "calibration", meta)
            save_recording(heldout, Path(source.save) / "heldout", held_meta)
    for graph in plan.quantized():
        if not calibration.feeds.get(graph.name):
            raise UsageError(f"no calibration data for graph {graph.name}: the recorded generations never called it",
                             hint="quantize it as fp16 (--per-module fp16=...) or record generations that use it")  # fmt: skip
    provenance = {
        "calibration": {"videos": len(calibration.videos), "prompts": meta["prompts"], "seed": meta["seed"],
                        "recorded": calibration.counts()},
        "heldout": {"videos": len(heldout.videos), "prompts": held_meta["prompts"], "seed": held_meta["seed"],
                    "recorded": heldout.counts()},
    }  # fmt: skip
    return calibration, heldout, provenance


def quantize_export(export: Path, out: Path, plan: QuantizationPlan, source: CalibrationSource, settings: QuantizeSettings,
                    *, overwrite: bool = False, progress: Callable[[str], None] | None = None,
                    video_progress: Callable[[str, int, int], None] | None = None) -> dict:  # fmt: skip
    """Quantize export artifact `export` into artifact `out` following `plan` (see the module
    docstring); returns quantize.json. Bad input: UsageError / ArtifactError before any file is
    written; a graph the HTP backend refuses: QnnUnsupportedError naming its nodes, nothing written."""
    from neodragon_cli.artifacts import ArtifactWriter
    from neodragon_cli.atomic import write_json

    export = Path(export)
    manifest = read_export(export)
    modules = None
    if plan.backend == "aimet-torch":
        check_aimet_torch()
        from neodragon_cli.pipelines.deploy.quantize_aimet_torch import rebuild_modules

        if progress:
            progress("aimet-torch: rebuilding the PyTorch modules from the export's source model")
        modules = rebuild_modules(export, manifest, [g.name for g in plan.quantized()], threads=settings.threads)
    if settings.qnn:
        from neodragon_cli.pipelines.deploy import qnn

        qnn.register()
    writer = ArtifactWriter(out, command="quantize", parent=export, overwrite=overwrite)
    calibration, heldout, provenance = gather_calibration(export, plan, source, video_progress)
    with writer as art:
        for path in _host_files(export, manifest):
            target = art.path / path.relative_to(export)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        entries = quantize_graphs(export, manifest, plan, calibration, heldout, art.path, settings, progress, modules)
        refused = unsupported_report(entries)
        if refused:
            raise QnnUnsupportedError(f"{len(refused)} graph(s) do not run entirely on QNN HTP: " + "; ".join(refused),
                                      hint="nothing was written; see quantize's docs (docs/quantize.md), or pass --no-qnn")  # fmt: skip
        write_export_manifest(manifest, entries, art.path)
        e2e = None
        generates = all(g in entries for g in ("t5", "mmdit_stage0", "decoder_first"))
        if settings.end_to_end and generates:
            if progress:
                progress("end to end: the quantized pipeline generates the held-out prompt")
            e2e = end_to_end(art.path, heldout, provenance["heldout"]["prompts"][0], provenance["heldout"]["seed"])
        report = {
            "format": QUANTIZE_FORMAT,
            "backend": plan.backend,
            "adaround_iterations": plan.adaround_iterations,
            "qnn": None if not settings.qnn else {"backend": "htp (x86-64 simulator)", "cpu_fallback": "disabled",
                                                   "htp_arch": settings.htp_arch, "soc_model": settings.soc_model,
                                                   "context_binaries": settings.qnn_context},  # fmt: skip
            **provenance,
            "graphs": entries,
            "end_to_end": e2e if e2e is not None else ("not run" if not settings.end_to_end else "the export cannot generate (needs t5, mmdit_stage0, decoder_first)"),
            "notes": plan.notes,
        }  # fmt: skip
        write_json(art.path / QUANTIZE_FILE, report)
        art.record("quantize", backend=plan.backend, schemes={n: e["scheme"] for n, e in entries.items()},
                   sqnr_db={n: e["sqnr_db"] for n, e in entries.items()},
                   end_to_end=None if e2e is None else {k: e2e[k] for k in ("sqnr_db", "psnr_db")})  # fmt: skip
    return report
