"""`profile` library parts: the report schema and its validator, budgets and regressions (exceeded
exactly when over), per-call memory measurement, target detection, and the AI Hub path up to the
configuration boundary and through faked client jobs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from neodragon_cli.pipelines.deploy import profile as prof

from neodragon_cli.errors import UsageError


def module(median: float, role: str = "mmdit", stage: int | None = 2) -> dict:
    return {"role": role, "stage": stage, "calls_per_video": 6, "latency_ms": {"min": median * 0.9, "median": median, "runs": [median], "first": median},
            "video_ms": median * 6, "load_ms": None, "weights_mb": 10.0, "working_mb": 2.0, "peak_mb": 12.0, "inputs": {},
            "compute_units": None, "notes": []}  # fmt: skip


def report(**medians: float) -> dict:
    return {
        "format": prof.FORMAT, "created": "2025-01-01T00:00:00", "target": {"path": "m", "kind": "model", "name": "m"},
        "runtime": "torch", "device": "cpu (fp32)", "latency_meaningful": True, "environment": {}, "settings": {}, "runs": 1,
        "load_seconds": 1.0, "end_to_end": {"seconds": 2.0, "components": {"mmdit": {"calls": 3, "seconds": 1.0, "peak_mb": 5.0}}},
        "modules": {name: module(ms, stage=int(name[-1]) if name.startswith("mmdit_stage") else None,
                                 role="mmdit" if name.startswith("mmdit") else name) for name, ms in medians.items()},
        "analytic": None, "checks": None, "notes": [],
    }  # fmt: skip


# ------------------------------------------------------------------------------------ schema


def test_a_report_validates_and_broken_ones_do_not():
    good = report(mmdit_stage0=10.0, mmdit_stage2=50.0, decoder=5.0)
    assert prof.validate(good) == []
    missing = copy.deepcopy(good)
    del missing["modules"]["decoder"]["peak_mb"]
    assert any("peak_mb" in p for p in prof.validate(missing))
    wrong = copy.deepcopy(good)
    wrong["modules"]["mmdit_stage0"]["latency_ms"]["median"] = "fast"
    assert any("median" in p for p in prof.validate(wrong))
    extra = copy.deepcopy(good)
    extra["surprise"] = 1
    assert any("surprise" in p for p in prof.validate(extra))
    assert any("format" in p for p in prof.validate({**good, "format": "other/1"}))
    assert any("runtime" in p for p in prof.validate({**good, "runtime": "tpu"}))


def test_the_schema_file_is_json_schema_and_agrees_with_the_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = prof.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    good = report(mmdit_stage2=50.0)
    jsonschema.validate(good, schema)
    broken = copy.deepcopy(good)
    broken["modules"]["mmdit_stage2"]["calls_per_video"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    assert prof.validate(broken)


# ------------------------------------------------------------------------------------ checks


@pytest.mark.parametrize("text, name, ms", [("mmdit_stage2=500", "mmdit_stage2", 500.0), ("decoder=0.2s", "decoder", 200.0),
                                            ("end_to_end=30s", "end_to_end", 30000.0), ("sr = 4.5ms", "sr", 4.5)])  # fmt: skip
def test_budgets_parse(text, name, ms):
    assert prof.parse_budgets([text]) == [prof.Budget(name, ms)]


@pytest.mark.parametrize("text", ["mmdit_stage2", "=5", "mmdit=fast", "mmdit=-1", "mmdit=0", "mmdit=nan"])
def test_bad_budgets_are_usage_errors(text):
    with pytest.raises(UsageError, match="bad --fail-over"):
        prof.parse_budgets([text])


def test_budgets_fail_exactly_when_exceeded():
    r = report(mmdit_stage0=10.0, mmdit_stage2=50.0)
    assert prof.check_budgets(r, prof.parse_budgets(["mmdit_stage2=50"])) == []  # equal is within budget
    assert len(prof.check_budgets(r, prof.parse_budgets(["mmdit_stage2=49.99"]))) == 1
    assert len(prof.check_budgets(r, prof.parse_budgets(["mmdit=20"]))) == 1  # a role covers every stage
    assert len(prof.check_budgets(r, prof.parse_budgets(["mmdit=5"]))) == 2
    assert prof.check_budgets(r, prof.parse_budgets(["end_to_end=2000"])) == []
    assert len(prof.check_budgets(r, prof.parse_budgets(["end_to_end=1999"]))) == 1
    with pytest.raises(UsageError, match="no such module"):
        prof.check_budgets(r, prof.parse_budgets(["unet=5"]))


def test_regression_fails_exactly_above_the_threshold():
    old = report(mmdit_stage2=100.0, decoder=10.0)
    assert prof.parse_regression("10%") == pytest.approx(0.10)
    ok, compared = prof.check_regression(report(mmdit_stage2=110.0, decoder=5.0), old, 0.10)
    assert ok == [] and compared["mmdit_stage2"]["change"] == pytest.approx(0.10)
    bad, _ = prof.check_regression(report(mmdit_stage2=110.5, decoder=10.0), old, 0.10)
    assert len(bad) == 1 and "mmdit_stage2" in bad[0]
    slow_e2e = report(mmdit_stage2=100.0)
    slow_e2e["end_to_end"]["seconds"] = 2.5
    assert [v for v in prof.check_regression(slow_e2e, old, 0.10)[0] if v.startswith("end_to_end")]
    for text in ("ten", "-5%"):
        with pytest.raises(UsageError):
            prof.parse_regression(text)


def test_a_baseline_must_be_a_profile_report(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps(report(decoder=1.0)))
    assert prof.read_report(tmp_path / "old.json")["modules"]["decoder"]["latency_ms"]["median"] == 1.0
    (tmp_path / "bad.json").write_text(json.dumps({"modules": {}}))
    with pytest.raises(UsageError, match="not a profile report"):
        prof.read_report(tmp_path / "bad.json")
    with pytest.raises(UsageError, match="does not exist"):
        prof.read_report(tmp_path / "none.json")


# ------------------------------------------------------------------------------------ measurement


def test_working_memory_of_a_call_is_measured():
    if not prof.reset_peak():
        pytest.skip("the peak-RSS mark cannot be reset on this system")

    def allocate():
        block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
        return float(block[-1])

    result = prof.measure(allocate, runs=2)
    assert 150 < result.working_mb < 400
    assert len(result.latency_ms) == 2 and min(result.latency_ms) > 0
    assert prof.measure(lambda: None, runs=1).working_mb < 20


def test_target_kinds(tmp_path):
    from neodragon_cli.artifacts import resolve_model

    assert prof.detect_kind(resolve_model("shapes-teacher")) == "model"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "export.json").write_text("{}")
    assert prof.detect_kind(tmp_path / "e") == "export"
    (tmp_path / "e" / "quantize.json").write_text("{}")
    assert prof.detect_kind(tmp_path / "e") == "quantized"
    with pytest.raises(UsageError, match="none of a model folder"):
        prof.detect_kind(tmp_path)
    with pytest.raises(UsageError, match="needs a model folder"):
        prof.check_runtime("export", "torch")
    with pytest.raises(UsageError, match="make an export first"):
        prof.check_runtime("model", "onnx")
    with pytest.raises(UsageError, match="unknown runtime"):
        prof.check_runtime("model", "tflite")


def test_plot_writes_a_png(tmp_path):
    prof.plot(report(mmdit_stage0=10.0, mmdit_stage2=500.0, decoder=5.0), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ AI Hub


@pytest.fixture
def no_config(tmp_path, monkeypatch):
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "missing" / "client.ini"))
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.fixture
def configured(tmp_path, monkeypatch):
    ini = tmp_path / "client.ini"
    ini.write_text("[api]\napi_token = test-token\napi_url = https://example.invalid\nweb_url = https://example.invalid\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    return ini


def test_aihub_without_a_token_says_how_to_configure(no_config):
    pytest.importorskip("qai_hub")
    from neodragon_cli.pipelines.deploy.aihub import check_ready

    with pytest.raises(UsageError) as info:
        check_ready("Snapdragon 8 Elite QRD")
    assert "qai-hub configure --api_token" in info.value.one_line()
    with pytest.raises(UsageError, match="needs --device"):
        check_ready(None)


def test_aihub_without_network_stops_before_any_work(configured, monkeypatch):
    hub = pytest.importorskip("qai_hub")
    from neodragon_cli.pipelines.deploy.aihub import check_ready

    def offline(**_):
        raise ConnectionError("Failed to establish a new connection: [Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "get_devices", offline)
    with pytest.raises(UsageError, match="cannot reach Qualcomm AI Hub"):
        check_ready("Snapdragon 8 Elite QRD")
    monkeypatch.setattr(hub, "get_devices", lambda **_: [])
    with pytest.raises(UsageError, match="no device named"):
        check_ready("Snapdragon 99")


class FakeCompileJob:
    job_id = "jc1"

    def __init__(self, log, kwargs):
        log.append(("compile", kwargs))

    def get_target_model(self):
        return "compiled-model"


class FakeInferenceJob:
    job_id = "jp1"

    def __init__(self, log, kwargs):
        log.append(("inference", kwargs))

    def download_profile(self):
        return {
            "execution_summary": {"estimated_inference_time": 4900, "all_inference_times": [5100, 4900, 5000],
                                  "inference_memory_peak_range": [10 * 2**20, 12 * 2**20], "warm_load_time": 30000},
            "execution_detail": [{"name": "conv", "type": "Conv2d", "compute_unit": "NPU", "execution_time": 10}] * 5
            + [{"name": "resize", "type": "Resize", "compute_unit": "CPU", "execution_time": 3}],
        }  # fmt: skip


def test_aihub_profile_through_faked_client_jobs(configured, monkeypatch, tmp_path):
    """The client's job objects replaced (no network): compile + profiling jobs per graph, the profile parsed
    into latency, peak memory and the op split."""
    import torch

    hub = pytest.importorskip("qai_hub")
    from neodragon_cli.pipelines.deploy import onnx_tools
    from neodragon_cli.pipelines.deploy.aihub import profile_on_device

    onnx_tools.export_module(torch.nn.Conv2d(3, 12, 3, padding=1).eval(), {"x": torch.randn(1, 3, 8, 8)}, ["y"], tmp_path / "sr.onnx", 17)
    manifest = {"graphs": {"sr": {"file": "sr.onnx", "component": "sr"}, "decoder_step": {"file": "decoder_step.onnx"}}}
    feeds = {"sr": [{"x": np.zeros((1, 3, 8, 8), np.float32)}]}  # decoder_step was never called: not profiled
    log = []
    monkeypatch.setattr(hub, "get_devices", lambda name="", **_: [hub.Device(name)])
    monkeypatch.setattr(hub, "submit_compile_job", lambda **kwargs: FakeCompileJob(log, kwargs))
    monkeypatch.setattr(hub, "submit_inference_job", lambda **kwargs: FakeInferenceJob(log, kwargs))
    records = profile_on_device(tmp_path, manifest, feeds, "Snapdragon 8 Elite QRD")
    assert [r.name for r in records] == ["sr"]
    (_, compiled), (_, inference) = log
    assert compiled["input_specs"] == {"x": ((1, 3, 8, 8), "float32")} and "--target_runtime" in compiled["options"]
    assert inference["model"] == "compiled-model" and inference["profile"] is True and inference["inputs"]["x"][0].shape == (1, 3, 8, 8)
    entry = records[0].as_dict()
    assert entry["latency_ms"]["min"] == pytest.approx(4.9) and entry["latency_ms"]["median"] == pytest.approx(5.0)
    assert entry["peak_mb"] == pytest.approx(12.0) and entry["load_ms"] == pytest.approx(30.0)
    assert entry["compute_units"] == {"npu": 5, "gpu": 0, "cpu": 1}
    assert prof.validate({**report(), "runtime": "aihub", "modules": {"sr": entry}}) == []
