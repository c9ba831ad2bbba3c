"""`profile`: per-module latency and peak memory of a video pipeline (the paper's Table 7), the
end-to-end generation time, budgets and regressions for CI, and the JSON report (schema:
`profile.schema.json` beside this file, documented in docs/profile.md).

    report = profile_pipeline(target, runtime="torch", settings=GenerationSettings(...), runs=5)
    problems = validate(report)                   # [] when the report matches the schema
    violations = check_budgets(report, parse_budgets(["mmdit_stage2=500"]))

Targets: a model folder (or embedded model name; runtime torch), an `export` artifact or a `quantize`
artifact (runtimes onnx, qnn, aihub). How one target is measured:

1. Load the pipeline (timed: `load_seconds`). For ONNX every graph gets a session.
2. One end-to-end generation at the chosen settings, timed per component by the pipeline's own
   `Profiler` (`end_to_end`); it also records, per module, the inputs of its last call (for a stage
   of the MMDiT: the longest history) and counts its calls.
3. Each module alone, on its recorded inputs: for ONNX a fresh session of the graph (its creation is
   `load_ms`); freed memory is handed back to the system, the peak-RSS mark is reset
   (/proc/self/clear_refs), one warm-up call runs (its RSS growth is `working_mb`), then `runs` timed
   calls give `latency_ms` min / median. `weights_mb` is the module's parameters (torch) or graph files
   (ONNX); `peak_mb` = weights + working memory: what the module needs when it is the only one
   resident, as each graph is on the phone.

Modules: `text_encoder` (torch: the prompt-to-embeddings call; ONNX: graphs `t5`, `clip_<i>`),
`context_adapter`, `mmdit_context` (Pyramid-Flow layout export), `mmdit_stage<s>`, `vae_encoder`
(hybrid first frame), `decoder` (torch: the streaming decode of all latent frames, reported per latent
frame; ONNX: `decoder_first`, `decoder_step`), `sr` (per call of the pipeline: one decoded chunk).
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neodragon_cli.errors import NeodragonError, UsageError

FORMAT = "neodragon-profile/1"
SCHEMA_FILE = Path(__file__).with_name("profile.schema.json")
RUNTIMES = ("torch", "onnx", "qnn", "aihub")
KINDS = ("model", "export", "quantized")
PROMPT = "a red circle moving left"
QNN_NOTE = "QNN HTP backend in the x86-64 simulator: op coverage and numerics are real, latency is meaningless"


class BudgetExceeded(NeodragonError):
    """A --fail-over budget or the --max-regression threshold was exceeded: exit 1."""

    exit_code = 1


# ------------------------------------------------------------------------------------ targets


def detect_kind(folder: Path) -> str:
    """model, export or quantized (UsageError when the folder is none of them)."""
    from neodragon_cli.pipelines.deploy.export import MANIFEST

    folder = Path(folder)
    if (folder / "quantize.json").is_file():
        return "quantized"
    if (folder / MANIFEST).is_file():
        return "export"
    from neodragon_cli.pipelines.flow.pipeline import detect_layout

    try:
        detect_layout(folder)
    except NeodragonError:
        raise UsageError(f"{folder} is none of a model folder, an export or a quantize artifact",
                         hint="give a pipeline folder, an embedded model name, or the output of `neodragon export` / `neodragon quantize`") from None  # fmt: skip
    return "model"


def check_runtime(kind: str, runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime '{runtime}'", hint=f"use one of: {', '.join(RUNTIMES)}")
    if runtime == "torch" and kind != "model":
        raise UsageError(f"--runtime torch needs a model folder; this is {'an' if kind == 'export' else 'a'} {kind} artifact",
                         hint="use --runtime onnx (or qnn, aihub)")  # fmt: skip
    if runtime != "torch" and kind == "model":
        raise UsageError(f"--runtime {runtime} runs exported graphs; this is a model folder",
                         hint="make an export first: neodragon export MODEL -o EXPORTED")  # fmt: skip


# ------------------------------------------------------------------------------------ memory


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    value = _status_mb("VmRSS")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the process's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    return _status_mb("VmHWM")


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc malloc_trim), so a later
    RSS growth is memory the next call really needs."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Measurement:
    latency_ms: list[float]
    first_ms: float
    working_mb: float | None


def measure(call: Callable[[], object], runs: int) -> Measurement:
    """One warm-up call (its RSS growth over the pre-call RSS is the working memory), then `runs`
    timed calls."""
    release_free_memory()
    base = rss_mb()
    resettable = reset_peak()
    start = time.perf_counter()
    call()
    first = (time.perf_counter() - start) * 1e3
    peak = peak_rss_mb() if resettable else None
    working = max(peak - base, 0.0) if peak is not None else None
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return Measurement(times, first, working)


# ------------------------------------------------------------------------------------ records


@dataclass
class ModuleRecord:
    """One module's entry of the report (see the schema)."""

    name: str
    role: str
    stage: int | None = None
    calls_per_video: int = 0
    replay_calls: int = 1  # network calls in one timed replay (torch decoder: every latent frame)
    latency: Measurement | None = None
    load_ms: float | None = None
    weights_mb: float | None = None
    inputs: dict = field(default_factory=dict)  # name -> shape
    compute_units: dict | None = None
    device_peak_mb: float | None = None  # a peak the device reported (AI Hub) instead of weights + working
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        per_call = [t / self.replay_calls for t in self.latency.latency_ms] if self.latency else []
        median = statistics.median(per_call) if per_call else None
        working = self.latency.working_mb if self.latency else None
        peak = None if self.weights_mb is None or working is None else self.weights_mb + working
        if self.device_peak_mb is not None:
            peak = self.device_peak_mb
        return {
            "role": self.role,
            "stage": self.stage,
            "calls_per_video": self.calls_per_video,
            "latency_ms": {"min": min(per_call) if per_call else None, "median": median, "runs": per_call,
                           "first": self.latency.first_ms / self.replay_calls if self.latency else None},  # fmt: skip
            "video_ms": None if median is None else median * self.calls_per_video,
            "load_ms": self.load_ms,
            "weights_mb": self.weights_mb,
            "working_mb": working,
            "peak_mb": peak,
            "inputs": self.inputs,
            "compute_units": self.compute_units,
            "notes": self.notes,
        }


def _shapes(value) -> object:
    import torch

    if isinstance(value, (torch.Tensor, np.ndarray)):
        return list(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return type(value).__name__


def _module_mb(module) -> float | None:
    import torch

    if not isinstance(module, torch.nn.Module):
        return None
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


# ------------------------------------------------------------------------------------ torch


def _stage_of(size: tuple[int, int], sizes: list[tuple[int, int]]) -> int:
    return sorted(set(sizes)).index(size)


class TorchRecorder:
    """Hooks on a `VideoPipeline`'s modules that count calls and keep each module's last inputs."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls: dict[str, int] = {}
        self.last: dict[str, tuple] = {}
        self.mmdit_sizes: list[tuple[int, int]] = []
        self.handles = []
        self.restore: list[Callable[[], None]] = []

    def _keep(self, key: str, args: tuple, kwargs: dict) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1
        self.last[key] = (args, kwargs)

    def __enter__(self) -> TorchRecorder:
        pipe = self.pipe
        for role in ("text_encoder", "context_adapter", "sr"):
            module = getattr(pipe, role)
            if module is not None:
                self.handles.append(module.register_forward_pre_hook(
                    lambda _m, args, kwargs, role=role: self._keep(role, args, kwargs), with_kwargs=True))  # fmt: skip

        def mmdit_hook(_m, args, kwargs):
            size = tuple(kwargs["sample"][0][-1].shape[-2:])
            self.mmdit_sizes.append(size)
            self._keep(f"mmdit@{size[0]}x{size[1]}", args, kwargs)

        self.handles.append(pipe.mmdit.register_forward_pre_hook(mmdit_hook, with_kwargs=True))
        vae = pipe.vae
        encode = vae.encode

        def recording_encode(*args, **kwargs):
            self._keep("vae_encoder", args, kwargs)
            return encode(*args, **kwargs)

        vae.encode = recording_encode
        self.restore.append(lambda: delattr(vae, "encode"))
        decoder = pipe.decoder or pipe.vae
        stream = decoder.stream_decode
        seen: list = []

        def recording_stream(chunks):
            seen.clear()

            def tee():
                for chunk in chunks:
                    seen.append(chunk)
                    yield chunk

            self.calls["decoder"] = 0
            self.last["decoder"] = ((seen,), {})
            for out in stream(tee()):
                self.calls["decoder"] = len(seen)
                yield out

        decoder.stream_decode = recording_stream
        self.restore.append(lambda: delattr(decoder, "stream_decode"))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        for undo in self.restore:
            undo()

    def replays(self) -> list[tuple[ModuleRecord, Callable[[], object]]]:
        """(record, call) per module, in pipeline order."""
        import torch

        pipe = self.pipe
        out = []

        def no_grad(fn):
            def call():
                with torch.no_grad():
                    return fn()

            return call

        for role in ("text_encoder", "context_adapter"):
            if role in self.last:
                args, kwargs = self.last[role]
                module = getattr(pipe, role)
                out.append((ModuleRecord(role, role, calls_per_video=self.calls[role], weights_mb=_module_mb(module),
                                         inputs={"args": _shapes(args)}),
                            no_grad(lambda m=module, a=args, k=kwargs: m(*a, **k))))  # fmt: skip
        sizes = sorted(set(self.mmdit_sizes))
        weights = _module_mb(pipe.mmdit)
        for size in sizes:
            key = f"mmdit@{size[0]}x{size[1]}"
            stage = _stage_of(size, self.mmdit_sizes)
            args, kwargs = self.last[key]
            record = ModuleRecord(f"mmdit_stage{stage}", "mmdit", stage=stage, calls_per_video=self.calls[key], weights_mb=weights,
                                  inputs={"clips": _shapes(kwargs["sample"][0]), "text": _shapes(kwargs["encoder_hidden_states"])},
                                  notes=["the stage's last call (longest history)"])  # fmt: skip
            out.append((record, no_grad(lambda k=kwargs: pipe.mmdit(**k))))
        if "vae_encoder" in self.last:
            args, kwargs = self.last["vae_encoder"]
            encoder = getattr(pipe.vae, "encoder", None)
            out.append((ModuleRecord("vae_encoder", "vae", calls_per_video=self.calls["vae_encoder"],
                                     weights_mb=_module_mb(encoder) if encoder is not None else _module_mb(pipe.vae),
                                     inputs={"args": _shapes(args)}),
                        no_grad(lambda a=args, k=kwargs: type(pipe.vae).encode(pipe.vae, *a, **k))))  # fmt: skip
        if "decoder" in self.last:
            (seen,), _ = self.last["decoder"]
            chunks = list(seen)
            decoder = pipe.decoder or pipe.vae
            weights = _module_mb(getattr(decoder, "decoder", None)) if pipe.decoder is None else _module_mb(decoder)
            record = ModuleRecord("decoder", "decoder", calls_per_video=len(chunks), replay_calls=len(chunks),
                                  weights_mb=weights, inputs={"latent": _shapes(chunks[0]) if chunks else None},
                                  notes=[f"one replay streams all {len(chunks)} latent frames; latency is per latent frame"])  # fmt: skip
            out.append((record, no_grad(lambda: list(type(decoder).stream_decode(decoder, iter(chunks))))))
        if "sr" in self.last:
            args, kwargs = self.last["sr"]
            out.append((ModuleRecord("sr", "sr", calls_per_video=self.calls["sr"], weights_mb=_module_mb(pipe.sr),
                                     inputs={"args": _shapes(args)}),
                        no_grad(lambda a=args, k=kwargs: pipe.sr(*a, **k))))  # fmt: skip
        return out


# ------------------------------------------------------------------------------------ ONNX


def check_qnn_available() -> None:
    """UsageError (exit 2) when the QNN execution provider cannot be loaded (no onnxruntime-qnn)."""
    import importlib.util

    from neodragon_cli.pipelines.deploy import qnn

    if importlib.util.find_spec("onnxruntime_qnn") is None:
        raise UsageError("--runtime qnn needs the onnxruntime-qnn package, which is not installed", hint="pip install onnxruntime-qnn")
    try:
        qnn.register()
    except qnn.QnnUnavailable as exc:
        raise UsageError(exc.message, hint=exc.hint) from None


def qnn_session(path: Path):
    """A QNN HTP session of the graph (`qnn.htp_session`: CPU fallback disabled, so a graph with a node
    the NPU does not take fails, naming it)."""
    import torch

    from neodragon_cli.pipelines.deploy import qnn

    try:
        return qnn.htp_session(path, threads=torch.get_num_threads())
    except qnn.UnsupportedNodes as exc:
        raise NeodragonError(f"the QNN HTP backend does not take every node of {exc}", hint="see docs/quantize.md") from None


def _graph_mb(folder: Path, entry: dict) -> float:
    files = entry.get("files") or [entry["file"]]
    return sum((folder / f).stat().st_size for f in files if (folder / f).exists()) / 2**20


def _graph_role(name: str, entry: dict) -> tuple[str, int | None]:
    if name.startswith("mmdit_stage"):
        return "mmdit", int(name.removeprefix("mmdit_stage"))
    if name in ("t5",) or name.startswith("clip_"):
        return "text_encoder", None
    if name.startswith("decoder"):
        return "decoder", None
    return {"vae_encoder": "vae"}.get(name, entry.get("component", name)), None


def onnx_replays(folder: Path, manifest: dict, feeds: dict[str, list], session_factory) -> list[tuple[ModuleRecord, Callable, Callable]]:
    """(record, make_session, call(session)) per recorded graph, in manifest order."""
    out = []
    for name, entry in manifest["graphs"].items():
        if not feeds.get(name):
            continue
        role, stage = _graph_role(name, entry)
        feed = feeds[name][-1]
        record = ModuleRecord(name, role, stage=stage, calls_per_video=len(feeds[name]), weights_mb=_graph_mb(folder, entry),
                              inputs={k: list(np.shape(v)) for k, v in feed.items()})  # fmt: skip
        if stage is not None:
            record.notes.append("the stage's last call (longest history; the graph is padded to it anyway)")
        path = folder / entry["file"]
        out.append((record, lambda p=path: session_factory(p), lambda s, f=feed: s.run(None, f)))
    return out


def record_onnx(folder: Path, settings_layers: list, *, seed: int = 0, image=None):
    """Load the exported pipeline with recording sessions, generate once; (pipe, resolved settings,
    profiler, seconds, feeds per graph, load seconds)."""
    import torch
    from neodragon_cli.pipelines.deploy import onnx_tools
    from neodragon_cli.pipelines.deploy.calibration import RecordingSession
    from neodragon_cli.pipelines.deploy.runtime import load_onnx_pipeline

    sessions: dict[str, RecordingSession] = {}

    def factory(path: Path):
        sessions[Path(path).name.removesuffix(".onnx")] = wrapped = RecordingSession(onnx_tools.session(path, threads=torch.get_num_threads()))
        return wrapped

    start = time.perf_counter()
    pipe = load_onnx_pipeline(folder, factory)
    load = time.perf_counter() - start
    settings, profiler, seconds = _generate(pipe, settings_layers, seed=seed, image=image)
    return pipe, settings, profiler, seconds, {name: s.feeds for name, s in sessions.items()}, load


# ------------------------------------------------------------------------------------ generation


def _generate(pipe, layers: list, *, seed: int, image):
    from neodragon_cli.pipelines.flow.pipeline import Profiler

    settings = pipe.settings(*layers)
    if settings.mode == "hybrid" and image is None and getattr(pipe, "first_frame", None) is None:
        image = np.full((settings.height, settings.width, 3), 127, dtype=np.uint8)  # a grey first frame
    pipe.check(settings, have_image=image is not None)
    profiler = Profiler(pipe.device)
    start = time.perf_counter()
    pipe.generate(PROMPT, settings, seed=seed, image=image, profile=profiler)
    return settings, profiler, time.perf_counter() - start


# ------------------------------------------------------------------------------------ profile


@dataclass
class Target:
    path: Path
    kind: str
    name: str


def environment() -> dict:
    import onnxruntime
    import torch

    from neodragon_cli import __version__

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"neodragon_version": __version__, "torch_version": torch.__version__, "onnxruntime_version": onnxruntime.__version__,
            "platform": platform.platform(), "cpu": cpu, "torch_threads": torch.get_num_threads()}  # fmt: skip


def profile_pipeline(target: Target, *, runtime: str, settings=None, runs: int = 5, seed: int = 0, dtype: str = "fp32",
                     progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Measure `target` with `runtime` (torch, onnx or qnn; aihub: `aihub.profile_on_device`) and
    return the report (see the module docstring and the schema)."""
    progress = progress or (lambda _msg: None)
    layers = [settings] if settings is not None else []
    notes: list[str] = []
    if runtime == "torch":
        from neodragon_cli.pipelines.flow.pipeline import VideoPipeline, parse_dtype

        progress("loading the pipeline")
        start = time.perf_counter()
        pipe = VideoPipeline.from_pretrained(target.path, dtype=parse_dtype(dtype), safety_checker=False)
        load = time.perf_counter() - start
        progress("end-to-end generation (recording every module's inputs)")
        with TorchRecorder(pipe) as recorder:
            resolved, profiler, seconds = _generate(pipe, layers, seed=seed, image=None)
        modules = []
        for record, call in recorder.replays():
            progress(f"timing {record.name}")
            record.latency = measure(call, runs)
            modules.append(record)
        device = f"cpu ({dtype})"
    else:
        from neodragon_cli.pipelines.deploy import onnx_tools
        from neodragon_cli.pipelines.deploy.runtime import read_manifest

        manifest = read_manifest(target.path)
        progress("loading the graphs")
        _, resolved, profiler, seconds, feeds, load = record_onnx(target.path, layers, seed=seed)
        import torch

        threads = torch.get_num_threads()  # the same intra-op threads as the torch runtime
        factory = (lambda path: onnx_tools.session(path, threads=threads)) if runtime == "onnx" else qnn_session
        if runtime == "qnn":
            check_qnn_available()
            notes.append(QNN_NOTE)
        modules = []
        for record, make, call in onnx_replays(target.path, manifest, feeds, factory):
            progress(f"timing {record.name}")
            release_free_memory()
            start = time.perf_counter()
            session = make()
            record.load_ms = (time.perf_counter() - start) * 1e3
            record.latency = measure(lambda s=session, c=call: c(s), runs)
            modules.append(record)
            del session
        device = f"cpu (onnxruntime CPUExecutionProvider, {threads} thread(s))" if runtime == "onnx" else "QNN HTP simulator (x86-64)"
        if runtime == "qnn":
            notes.append("end_to_end was measured with the CPU execution provider (the recording run)")
    if resolved.mode == "hybrid" and (runtime != "torch" or pipe.first_frame is None):
        notes.append("hybrid mode without a first-frame generator: a grey first frame was encoded")
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": {"path": str(target.path), "kind": target.kind, "name": target.name},
        "runtime": runtime,
        "device": device,
        "latency_meaningful": runtime != "qnn",
        "environment": environment(),
        "settings": {k: v for k, v in resolved.as_dict().items() if k not in ("prompt_modifier", "negative_prompt")},
        "runs": runs,
        "load_seconds": load,
        "end_to_end": {"seconds": seconds, "components": profiler.as_dict(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "modules": {m.name: m.as_dict() for m in modules},
        "analytic": None,
        "checks": None,
        "notes": notes,
    }


def profile_real_size(name: str, *, settings, runs: int = 1, dtype: str = "fp32", modules: list[str] | None = None,
                      progress: Callable[[str], None] | None = None) -> list[ModuleRecord]:  # fmt: skip
    """Each network of a published-size pipeline (`analytic.real_size_builders`) with random weights,
    built, measured on inputs of the schedule's shapes (the MMDiT: each stage's longest-history call)
    and freed one at a time, as the phone holds one graph at a time. `settings` resolved; `modules`:
    names to keep (default all). No end-to-end run."""
    import torch
    from neodragon_cli.pipelines.deploy import analytic
    from neodragon_cli.pipelines.flow.pipeline import parse_dtype

    progress = progress or (lambda _msg: None)
    dt = parse_dtype(dtype)
    builders = analytic.real_size_builders(name)
    config = settings.sampling_config()
    hybrid = settings.mode == "hybrid"
    scale = 8
    latents = (settings.frames - 1) // 8 + 1
    latent_size = (settings.height // scale, settings.width // scale)
    calls = analytic.schedule_calls(config, latent_frames=latents, latent_size=latent_size, patch_size=2, text_tokens=128, hybrid=hybrid)

    def cast(x):
        return x.to(dt) if x.is_floating_point() else x

    plan: list[tuple[str, str, int | None, int, Callable, Callable]] = []  # name, role, stage, calls, build, make inputs
    plan.append(("t5", "text_encoder", None, 1, builders["t5"], lambda m: ((torch.zeros(1, 128, dtype=torch.long),), {})))
    for i in range(2):
        plan.append((f"clip_{i}", "text_encoder", None, 1, lambda i=i: builders["clips"]()[i], lambda m: ((torch.zeros(1, 77, dtype=torch.long),), {})))
    if "context_adapter" in builders:
        plan.append(("context_adapter", "context_adapter", None, 1, builders["context_adapter"], lambda m: ((torch.randn(1, 128, 4096),), {})))
    for stage in range(3):
        stage_calls = [c for c in calls if c.stage == stage]
        longest = stage_calls[-1]

        def inputs(m, call=longest):
            clips = [torch.randn(call.batch, m.out_channels, 1, h, w) for h, w in call.frame_sizes]
            return (), dict(sample=[clips], encoder_hidden_states=torch.randn(call.batch, 128, m.text_width), encoder_attention_mask=None,
                            pooled_projections=torch.randn(call.batch, m.config["pooled_projection_dim"]), timestep_ratio=torch.tensor([500.0] * call.batch))  # fmt: skip

        plan.append((f"mmdit_stage{stage}", "mmdit", stage, sum(c.steps * (max(1, c.batch)) for c in stage_calls), builders["mmdit"], inputs))
    if hybrid:
        plan.append(("vae_encoder", "vae", None, 1, builders["vae"], "encode"))
    plan.append(("decoder", "decoder", None, latents, builders["vae"], None))
    if "sr" in builders and settings.sr:
        plan.append(("sr", "sr", None, settings.frames, builders["sr"], lambda m: ((torch.rand(1, 3, settings.height, settings.width),), {})))
    records, built = [], None  # built: (builder, network, load ms), kept for the next entry with the same builder (MMDiT stages)
    for module_name, role, stage, per_video, build, make_inputs in plan:
        if modules and module_name not in modules and role not in modules:
            continue
        if built is not None and built[0] is build and make_inputs not in (None, "encode"):
            network, load = built[1], built[2]
        else:
            built = network = None
            progress(f"building {module_name} (random weights, {dtype})")
            release_free_memory()
            start = time.perf_counter()
            torch.manual_seed(0)
            network = build().eval().to(dt)
            load = (time.perf_counter() - start) * 1e3
            built = (build, network, load)
        record = ModuleRecord(module_name, role, stage=stage, calls_per_video=per_video, load_ms=load, weights_mb=_module_mb(network),
                              notes=["random weights; load_ms is building and initialising the module"])  # fmt: skip
        if make_inputs == "encode":  # the hybrid first frame through the VAE encoder (+ quant conv)
            del network.decoder
            record.weights_mb = _module_mb(network)
            frame = torch.randn(1, 3, 1, settings.height, settings.width, dtype=dt)
            record.inputs = {"video": list(frame.shape)}

            def call(network=network, frame=frame):
                return network.encode(frame)

        elif make_inputs is None:  # the streaming decoder over every latent frame of the video
            chunks = [torch.randn(1, 16, 1, *latent_size, dtype=dt) for _ in range(latents)]
            record.replay_calls = latents
            record.inputs = {"latent": [1, 16, 1, *latent_size]}
            record.notes.append(f"one replay streams all {latents} latent frames; latency is per latent frame")

            def call(network=network, chunks=chunks):
                return list(network.stream_decode(iter(chunks)))

            if hasattr(network, "encoder"):
                del network.encoder  # the decoder alone is resident
            record.weights_mb = _module_mb(network)
        else:
            args, kwargs = make_inputs(network)
            args = tuple(cast(a) for a in args)
            kwargs = {k: ([[cast(c) for c in v[0]]] if k == "sample" else cast(v) if isinstance(v, torch.Tensor) and k != "timestep_ratio" else v)
                      for k, v in kwargs.items()}  # fmt: skip
            record.inputs = {"args": _shapes(args), **({"clips": _shapes(kwargs["sample"][0])} if "sample" in kwargs else {})}

            def call(network=network, args=args, kwargs=kwargs):
                return network(*args, **kwargs)

        progress(f"timing {module_name}")
        with torch.no_grad():
            record.latency = measure(call, runs)
        records.append(record)
        if make_inputs in (None, "encode"):
            built = None  # a VAE with a part deleted is not reused
        del network, call
    return records


# ------------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class Budget:
    name: str  # a module name, a role, or end_to_end
    ms: float


def parse_budgets(items: list[str] | None) -> list[Budget]:
    """`module=ms` items (a value may end in ms or s) -> budgets; UsageError on bad syntax."""
    out = []
    for item in items or []:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        scale = 1.0
        if value.endswith("ms"):
            value = value[:-2]
        elif value.endswith("s"):
            value, scale = value[:-1], 1000.0
        try:
            ms = float(value) * scale
        except ValueError:
            ms = math.nan
        if not sep or not name or not math.isfinite(ms) or ms <= 0:
            raise UsageError(f"bad --fail-over '{item}'", hint="use MODULE=MILLISECONDS, e.g. mmdit_stage2=500 or end_to_end=30s")
        out.append(Budget(name, ms))
    return out


def parse_regression(text: str | None) -> float | None:
    """'10%' or '10' -> 0.10 (UsageError otherwise)."""
    if text is None:
        return None
    try:
        value = float(text.strip().removesuffix("%")) / 100
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"bad --max-regression '{text}'", hint="give a percentage, e.g. 10%")
    return value


def _median(entry: dict) -> float | None:
    return entry["latency_ms"]["median"]


def check_budgets(report: dict, budgets: list[Budget]) -> list[str]:
    """Violations (one line each); UsageError for a budget naming nothing that was measured."""
    violations = []
    for budget in budgets:
        if budget.name == "end_to_end":
            seconds = (report.get("end_to_end") or {}).get("seconds")
            if seconds is None:
                raise UsageError("--fail-over end_to_end: this run has no end-to-end time")
            if seconds * 1e3 > budget.ms:
                violations.append(f"end_to_end: {seconds * 1e3:.1f} ms > budget {budget.ms:g} ms")
            continue
        matched = {n: e for n, e in report["modules"].items() if n == budget.name or e["role"] == budget.name}
        if not matched:
            raise UsageError(f"--fail-over {budget.name}: no such module was measured",
                             hint=f"measured: {', '.join(report['modules'])} (or a role, or end_to_end)")  # fmt: skip
        for name, entry in matched.items():
            median = _median(entry)
            if median is not None and median > budget.ms:
                violations.append(f"{name}: median {median:.2f} ms > budget {budget.ms:g} ms")
    return violations


def check_regression(report: dict, baseline: dict, max_fraction: float) -> tuple[list[str], dict]:
    """Violations and a comparison {module: {baseline_ms, ms, change}} of median latency per module
    (and end_to_end) present in both reports."""
    compared, violations = {}, []
    pairs = [(n, _median(e), _median(baseline["modules"][n])) for n, e in report["modules"].items() if n in baseline.get("modules", {})]
    old_e2e, new_e2e = (baseline.get("end_to_end") or {}).get("seconds"), (report.get("end_to_end") or {}).get("seconds")
    if old_e2e and new_e2e:
        pairs.append(("end_to_end", new_e2e * 1e3, old_e2e * 1e3))
    for name, new, old in pairs:
        if new is None or not old:
            continue
        change = new / old - 1
        compared[name] = {"baseline_ms": old, "ms": new, "change": change}
        if new > old * (1 + max_fraction) * (1 + 1e-12):  # exactly at the threshold passes (float rounding aside)
            violations.append(f"{name}: {new:.2f} ms vs baseline {old:.2f} ms (+{100 * change:.1f}% > {100 * max_fraction:g}%)")
    return violations, compared


def read_report(path: Path) -> dict:
    """A profile JSON (a --baseline): UsageError when it is missing, not JSON or off-schema."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"baseline {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"baseline {path} is not a JSON file: {exc}") from None
    problems = validate(report)
    if problems:
        raise UsageError(f"baseline {path} is not a profile report: {problems[0]}", hint="give a file written by neodragon profile --json")
    return report


# ------------------------------------------------------------------------------------ schema


def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(instance, node: dict | None = None, path: str = "$", root: dict | None = None) -> list[str]:
    """Problems of `instance` against the report schema (the keywords it uses: $ref into $defs, type,
    enum, const, required, properties, additionalProperties, items, minimum)."""
    root = root or schema()
    node = root if node is None else node
    if "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    problems = []
    types = node.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_type_ok(instance, t) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(instance).__name__}"]
    if "const" in node and instance != node["const"]:
        problems.append(f"{path}: expected {node['const']!r}")
    if "enum" in node and instance not in node["enum"]:
        problems.append(f"{path}: {instance!r} is not one of {node['enum']}")
    if "minimum" in node and isinstance(instance, (int, float)) and not isinstance(instance, bool) and instance < node["minimum"]:
        problems.append(f"{path}: {instance} < {node['minimum']}")
    if isinstance(instance, dict):
        for key in node.get("required", []):
            if key not in instance:
                problems.append(f"{path}: missing '{key}'")
        properties = node.get("properties", {})
        extra = node.get("additionalProperties", True)
        for key, value in instance.items():
            if key in properties:
                problems += validate(value, properties[key], f"{path}.{key}", root)
            elif extra is False:
                problems.append(f"{path}: unexpected '{key}'")
            elif isinstance(extra, dict):
                problems += validate(value, extra, f"{path}.{key}", root)
    if isinstance(instance, list) and "items" in node:
        for i, value in enumerate(instance):
            problems += validate(value, node["items"], f"{path}[{i}]", root)
    return problems


# ------------------------------------------------------------------------------------ output


def table_rows(report: dict) -> list[list[str]]:
    """Rows of the Table-7-shaped table: module, calls/video, min / median ms, load ms, weights /
    working / peak MB, share of the video in s (+ predicted ms and NPU/GPU/CPU ops where known)."""

    def fmt(value, spec=".1f"):
        return "-" if value is None else format(value, spec)

    analytic = (report.get("analytic") or {}).get("predicted", {}).get("modules", {})
    rows = []
    for name, e in report["modules"].items():
        units = e.get("compute_units")
        rows.append([
            name, str(e["calls_per_video"]), fmt(e["latency_ms"]["min"], ".2f"),
            fmt(e["latency_ms"]["median"], ".2f") if e["latency_ms"]["median"] is not None  # --runs 0: the warm-up call, starred
            else fmt(e["latency_ms"].get("first"), ".2f") + "*",
            fmt(e["load_ms"]), fmt(e["weights_mb"]), fmt(e["working_mb"]), fmt(e["peak_mb"]),
            fmt(None if e["video_ms"] is None else e["video_ms"] / 1e3, ".2f"),
            fmt(analytic.get(name, {}).get("predicted_ms"), ".2f"),
            "-" if not units else " / ".join(str(units.get(k, 0)) for k in ("npu", "gpu", "cpu")),
        ])  # fmt: skip
    return rows


TABLE_HEADER = ["module", "calls", "min ms", "med ms", "load ms", "weights MB", "work MB", "peak MB", "s/video",
                "pred ms", "NPU/GPU/CPU"]  # fmt: skip


def plot(report: dict, path: Path) -> None:
    """A PNG: median latency per call per module (bars, min as a tick) and peak memory per module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neodragon_cli.atomic import atomic_path

    names = list(report["modules"])
    entries = [report["modules"][n] for n in names]
    median = [e["latency_ms"]["median"] or 0 for e in entries]
    low = [e["latency_ms"]["min"] or 0 for e in entries]
    peak = [e["peak_mb"] or 0 for e in entries]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2), sharey=True)
    y = np.arange(len(names))
    ax1.barh(y, median, color="tab:blue", label="median")
    ax1.scatter(low, y, color="black", marker="|", s=200, label="min", zorder=3)
    ax1.set_xscale("log" if max(median, default=0) > 100 * max(min((m for m in median if m > 0), default=1), 1e-9) else "linear")
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax1.set_xlabel("latency per call (ms)")
    ax1.legend(loc="lower right")
    ax2.barh(y, peak, color="tab:orange")
    ax2.set_xlabel("peak memory (MB): weights + working")
    e2e = (report.get("end_to_end") or {}).get("seconds")
    title = f"{report['target']['name']} - {report['runtime']} on {report['device']}"
    if e2e is not None:
        title += f" - end to end {e2e:.1f} s"
    if not report.get("latency_meaningful", True):
        title += " (simulator: latency meaningless)"
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

