"""`profile --runtime aihub`: per-graph latency, peak memory and the NPU / GPU / CPU op split of an
export (or quantize) artifact on a real device through Qualcomm AI Hub (`qai-hub`).

    check_ready("Snapdragon 8 Elite QRD")          # before any work: package, token, network, device
    records = profile_on_device(folder, manifest, feeds, "Snapdragon 8 Elite QRD")

Per graph: `submit_compile_job(model, device, input_specs, options="--target_runtime ...")`, then
`submit_inference_job(compiled, device, inputs, profile=True)` on the inputs recorded from a local
ONNX Runtime run of the pipeline, then `download_profile()`: `execution_summary` gives the inference
times (µs), the peak-memory range (bytes) and the load time, `execution_detail` the compute unit of
every op. Graphs above 2 GB (weights in `<graph>.onnx.data`) go up as a folder holding model.onnx +
model.data, as AI Hub takes them.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from neodragon_cli.pipelines.deploy.profile import (
    Measurement,
    ModuleRecord,
    onnx_replays,
)

from neodragon_cli.errors import UsageError

CONFIGURE_HINT = "run `qai-hub configure --api_token YOUR_TOKEN` (the token is in your AI Hub account settings)"
DEFAULT_OPTIONS = "--target_runtime qnn_context_binary"


def check_ready(device: str | None):
    """The `qai_hub` module once the package is installed, a client token is configured, AI Hub
    answers and knows `device`; otherwise UsageError (exit 2) with one line saying what to do."""
    if not device:
        raise UsageError("--runtime aihub needs --device NAME", hint="e.g. --device \"Snapdragon 8 Elite QRD\"; list them with `qai-hub list-devices`")
    try:
        import qai_hub as hub
    except ImportError:
        raise UsageError("--runtime aihub needs the qai-hub package, which is not installed", hint=f"pip install qai-hub, then {CONFIGURE_HINT}") from None
    try:
        config = hub.api_utils.load_default_api_config()
    except Exception:  # noqa: BLE001 -- a missing or unreadable client.ini, whatever the client raises
        raise UsageError("Qualcomm AI Hub is not configured (no client configuration file)", hint=CONFIGURE_HINT) from None
    if not getattr(config, "api_token", None):
        raise UsageError("Qualcomm AI Hub is not configured (no api_token in the client configuration)", hint=CONFIGURE_HINT)
    try:
        devices = hub.get_devices(name=device)
    except Exception as exc:  # noqa: BLE001 -- no network, a refused token, the service down: all stop here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot reach Qualcomm AI Hub: {first}", hint=f"check the network and the token; {CONFIGURE_HINT}") from None
    if not devices:
        raise UsageError(f"AI Hub has no device named '{device}'", hint="list them with `qai-hub list-devices`")
    return hub


def _upload_path(graph: Path, scratch: Path) -> Path:
    """The graph file, or for external weights a folder with model.onnx + model.data."""
    data = graph.with_name(graph.name + ".data")
    if not data.exists():
        return graph
    import onnx

    folder = scratch / graph.stem
    folder.mkdir()
    model = onnx.load(str(graph))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="model.data")
    return folder


def parse_profile(profile: dict) -> tuple[list[float], float | None, float | None, dict]:
    """(inference times ms, peak memory MB, load ms, ops per compute unit) of a downloaded profile."""
    summary = profile.get("execution_summary", {})
    times = summary.get("all_inference_times") or ([summary["estimated_inference_time"]] if "estimated_inference_time" in summary else [])
    peak_range = summary.get("inference_memory_peak_range") or summary.get("estimated_inference_peak_memory_range")
    peak = max(peak_range) / 2**20 if peak_range else None
    load = summary.get("warm_load_time") or summary.get("first_load_time")
    units = Counter(str(op.get("compute_unit", "")).lower() for op in profile.get("execution_detail", []))
    return [t / 1e3 for t in times], peak, None if load is None else load / 1e3, {k: units.get(k, 0) for k in ("npu", "gpu", "cpu")}


def profile_on_device(folder: Path, manifest: dict, feeds: dict[str, list], device: str, *, options: str = DEFAULT_OPTIONS,
                      progress=None) -> list[ModuleRecord]:  # fmt: skip
    """Compile and profile every recorded graph of the artifact `folder` on the AI Hub `device`."""
    hub = check_ready(device)
    target = hub.Device(device)
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for record, _make, _call in onnx_replays(folder, manifest, feeds, session_factory=None):
            if progress is not None:
                progress(f"AI Hub: compiling and profiling {record.name} on {device}")
            feed = feeds[record.name][-1]
            graph = folder / manifest["graphs"][record.name]["file"]
            specs = {name: (tuple(np.shape(value)), np.asarray(value).dtype.name) for name, value in feed.items()}
            compile_job = hub.submit_compile_job(model=str(_upload_path(graph, Path(scratch))), device=target, input_specs=specs,
                                                 options=options, name=f"neodragon-{record.name}")  # fmt: skip
            compiled = compile_job.get_target_model()
            if compiled is None:
                status = compile_job.wait()
                raise UsageError(f"AI Hub could not compile {record.name} for {device}: {getattr(status, 'message', status)}",
                                 hint=f"see {getattr(compile_job, 'url', 'the job page')}")  # fmt: skip
            inputs = {name: [np.asarray(value)] for name, value in feed.items()}
            job = hub.submit_inference_job(model=compiled, device=target, inputs=inputs, profile=True, name=f"neodragon-{record.name}")
            times, peak, load, units = parse_profile(job.download_profile())
            record.latency = Measurement(times, times[0] if times else 0.0, None)
            record.load_ms = load
            record.weights_mb = None  # the device's peak covers weights and activations
            record.compute_units = units
            record.notes.append(f"AI Hub {device}: peak memory {'unknown' if peak is None else f'{peak:.1f} MB'} (upper end of the measured range); "
                                f"compile job {getattr(compile_job, 'job_id', '?')}, profile job {getattr(job, 'job_id', '?')}")  # fmt: skip
            record.device_peak_mb = peak
            records.append(record)
    return records
