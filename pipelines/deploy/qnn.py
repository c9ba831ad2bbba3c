"""ONNX Runtime's QNN execution provider (the `onnxruntime-qnn` plugin) with the HTP backend.

    check = htp_check(path, feeds)          # every node on HTP? HTP output vs CPU EP output
    check = htp_check(path, feeds, context_dir=folder, htp_arch="79", soc_model="69")   # + EP context binary

On x86-64 the HTP backend runs in a host simulator: which nodes it takes and the numbers it computes
(W8A16 QDQ integer kernels, fp16 for float graphs) are those of the NPU; its latency means nothing.
Sessions are made with `session.disable_cpu_ep_fallback=1`, so a graph loads only when every node runs
on HTP; otherwise ONNX Runtime logs the nodes the EP refused ("Unsupported nodes in QNN EP: { name: N,
type: T }, ...") and session creation fails; `htp_check` reads that log and names them.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from neodragon_cli.errors import NeodragonError
from neodragon_cli.pipelines.deploy import onnx_tools

EP_NAME = "QNNExecutionProvider"
# the x86-64 simulator needs an architecture (without one, graph finalisation fails with
# QNN_COMMON_ERROR_MEM_ALLOC): HTP v79 on the Snapdragon 8 Elite-class SoC model 69
DEFAULT_HTP_ARCH, DEFAULT_SOC_MODEL = "79", "69"
_UNSUPPORTED = re.compile(r"\{ name: ([^,]*), type: ([^ }]*) \}")


class QnnUnavailable(NeodragonError):
    """The QNN EP cannot be loaded here (no onnxruntime-qnn, or an ONNX Runtime without plugin EPs)."""


def register() -> list:
    """Register the plugin EP once; its OrtEpDevices."""
    import onnxruntime as ort

    try:
        import onnxruntime_qnn
    except ImportError:
        raise QnnUnavailable("onnxruntime-qnn is not installed", hint="pip install onnxruntime-qnn, or pass --no-qnn") from None
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        try:
            ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
        except Exception as exc:  # an ONNX Runtime without plugin EPs, or a platform without the library
            raise QnnUnavailable(f"cannot register the QNN execution provider: {exc}", hint="pass --no-qnn") from None
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    return devices


@contextmanager
def _native_output_to(path: Path):
    """Send file descriptors 1 and 2 (ONNX Runtime's C++ logger, the QNN libraries' banners) to `path` meanwhile."""
    saved = [os.dup(1), os.dup(2)]
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def htp_session(path: Path, *, threads: int = 1, htp_arch: str = DEFAULT_HTP_ARCH, soc_model: str = DEFAULT_SOC_MODEL,
                context_file: Path | None = None):  # fmt: skip
    """A session on the HTP backend with CPU fallback disabled. Raises `UnsupportedNodes` naming the
    nodes the EP refused (or RuntimeError with ONNX Runtime's message when it refused for another reason)."""
    import onnxruntime as ort

    devices = register()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_file is not None:
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_file_path", str(context_file))
        options.add_session_config_entry("ep.context_embed_mode", "0")
    provider = {"backend_type": "htp", "offload_graph_io_quantization": "0", "htp_arch": str(htp_arch), "soc_model": str(soc_model)}
    options.add_provider_for_devices(devices, provider)
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "ort.log"
        try:
            with _native_output_to(log):
                return ort.InferenceSession(str(path), options)
        except Exception as exc:
            text = log.read_text(errors="replace")
            nodes = list(dict.fromkeys(_UNSUPPORTED.findall(text)))
            if nodes:
                raise UnsupportedNodes(Path(path).stem, nodes) from None
            raise RuntimeError(f"QNN HTP session for {Path(path).name} failed: {str(exc).splitlines()[0]}") from None


class UnsupportedNodes(Exception):
    def __init__(self, graph: str, nodes: list[tuple[str, str]]):
        super().__init__(f"{graph}: " + ", ".join(f"{name} ({op})" for name, op in nodes))
        self.graph, self.nodes = graph, nodes


@dataclass
class HtpCheck:
    """What `htp_check` found for one graph."""

    loaded: bool
    unsupported: list[dict] = field(default_factory=list)  # [{"node", "op"}]
    error: str | None = None
    samples: int = 0
    sqnr_vs_cpu_db: float | None = None  # worst output, over `samples` feeds
    max_abs_diff_vs_cpu: float | None = None
    context_files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def htp_check(path: Path, feeds: list[dict[str, np.ndarray]], *, threads: int = 1, htp_arch: str = DEFAULT_HTP_ARCH,
              soc_model: str = DEFAULT_SOC_MODEL, context_dir: Path | None = None) -> HtpCheck:  # fmt: skip
    """Load `path` on HTP with fallback disabled and run `feeds` on it and on the CPU EP: worst SQNR
    and max |diff| of HTP against CPU over every output. With `context_dir`, also write the EP context
    model `<name>_ctx.onnx` + binary `<name>_qnn.bin` there (for `htp_arch` / `soc_model`)."""
    path = Path(path)
    context_file = None if context_dir is None else Path(context_dir) / f"{path.stem}_ctx.onnx"
    try:
        session = htp_session(path, threads=threads, htp_arch=htp_arch, soc_model=soc_model, context_file=context_file)
    except UnsupportedNodes as exc:
        return HtpCheck(False, [{"node": n, "op": op} for n, op in exc.nodes])
    except RuntimeError as exc:
        return HtpCheck(False, error=str(exc))
    check = HtpCheck(True, samples=len(feeds))
    if context_file is not None:
        check.context_files = sorted(p.name for p in Path(context_dir).glob(f"{path.stem}_*"))
    cpu = onnx_tools.session(path, threads)
    worst, diff = onnx_tools.SQNR_CAP_DB, 0.0
    for feed in feeds:
        for reference, output in zip(cpu.run(None, feed), session.run(None, feed)):
            reference, output = torch.from_numpy(np.asarray(reference)), torch.from_numpy(np.asarray(output))
            worst = min(worst, onnx_tools.sqnr_db(reference, output))
            diff = max(diff, onnx_tools.max_abs_diff(reference, output))
    if feeds:
        check.sqnr_vs_cpu_db, check.max_abs_diff_vs_cpu = worst, diff
    return check
