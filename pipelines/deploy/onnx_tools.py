"""ONNX plumbing for export: trace a module to a file, the mask-constant pass, the shape-folding
pass, graph facts, ONNX Runtime sessions and the comparison metrics.

Export uses torch's TorchScript-based exporter (`dynamo=False`): it needs no extra package, folds
constants, and gives plain static graphs for opset 17 (what NPU converters take). Graphs above 2 GB
keep their weights in one external-data file beside the .onnx.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

PROTOBUF_LIMIT = 2**31 - 1
LARGE_NEGATIVE = -1e4  # a constant below this is a mask fill (-inf, finfo.min) that breaks NPU quantization
SQNR_CAP_DB = 200.0  # reported for an exact match


def export_module(module: torch.nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str], path: Path,
                  opset: int) -> None:  # fmt: skip
    """Trace `module(*inputs.values())` to `path` (static shapes, constants folded)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module, tuple(inputs.values()), str(path), input_names=list(inputs), output_names=output_names,
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )  # fmt: skip


def load(path: Path):
    import onnx

    return onnx.load(str(path))


def save(model, path: Path) -> None:
    """Write `model`; weights go to `<name>.data` beside it when the graph exceeds protobuf's 2 GB."""
    import onnx

    large = sum(t.ByteSize() for t in model.graph.initializer) > PROTOBUF_LIMIT // 2
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data")  # fmt: skip


def _constant_tensors(model):
    """(owner name, TensorProto) of every initializer and every Constant / ConstantOfShape value."""
    for tensor in model.graph.initializer:
        yield tensor.name, tensor
    for node in model.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            for attribute in node.attribute:
                if attribute.name == "value":
                    yield node.output[0], attribute.t


def rewrite_mask_constants(model, fill: float) -> list[dict]:
    """Replace every float constant value below -1e4 (incl. -inf) by `fill`, in place. Returns what
    changed: [{"constant", "values", "was"}] (the smallest old value)."""
    from onnx import numpy_helper

    changes = []
    for owner, tensor in _constant_tensors(model):
        array = numpy_helper.to_array(tensor)
        if not np.issubdtype(array.dtype, np.floating):
            continue
        low = array < LARGE_NEGATIVE
        if low.any():
            changes.append({"constant": owner, "values": int(low.sum()), "was": float(array[low].min())})
            fixed = np.where(low, np.asarray(fill, dtype=array.dtype), array)
            tensor.CopyFrom(numpy_helper.from_array(fixed, tensor.name))
    return changes


FOLD_LIMIT = 2**20  # elements: larger computed values stay computed (keeps the file size)


def fold_constants(model, keep: tuple[str, ...] = ()) -> dict:
    """Fold, in place and until nothing changes, every node whose value is known before run time:
    `Shape` of a statically shaped tensor (shape inference, redone after each round as folded shapes
    make more shapes static), and any deterministic node whose inputs are all constants (the Gather /
    Mod / Concat / Cast arithmetic tracing leaves on shapes), evaluated with ONNX's reference
    implementation; every `Constant` becomes an initializer and nodes nothing reads are dropped.
    Nodes of the op types in `keep` stay (a QDQ graph keeps its weights' QuantizeLinear /
    DequantizeLinear). Returns {"nodes_before", "nodes_after", "folded": {op: count}}."""
    before, folded = len(model.graph.node), Counter()
    while True:
        count = _fold_once(model, keep)
        if not count:
            break
        folded.update(count)
    return {"nodes_before": before, "nodes_after": len(model.graph.node), "folded": dict(sorted(folded.items()))}


def _fold_once(model, keep: tuple[str, ...] = ()) -> Counter:
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shapes = {}
    for value in onnx.shape_inference.infer_shapes(model).graph.value_info[:] + graph.input[:]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[value.name] = [d.dim_value for d in tensor_type.shape.dim]
    folded, kept = Counter(), []
    for node in graph.node:
        value = None
        if node.op_type == "Constant":
            value = numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
        elif node.op_type == "Shape" and node.input[0] in shapes:
            attrs = {a.name: a.i for a in node.attribute}
            value = np.array(shapes[node.input[0]][attrs.get("start", 0) : attrs.get("end")], dtype=np.int64)
        elif (len(node.output) == 1 and node.input and all(i in known for i in node.input if i)
              and not node.op_type.startswith("Random") and node.op_type not in keep):  # fmt: skip
            with np.errstate(all="ignore"):
                value = ReferenceEvaluator(node).run(None, {i: known[i] for i in node.input if i})[0]
        if value is None or np.size(value) > FOLD_LIMIT:
            kept.append(node)
            continue
        known[node.output[0]] = np.asarray(value)
        folded[node.op_type] += 1
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(kept):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    initializers = [numpy_helper.from_array(known[name], name) for name in sorted(needed) if name in known]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(reversed(live))
    graph.initializer.extend(initializers)
    return folded


def graph_facts(model) -> dict:
    """Facts the NPU cares about: node and op counts, the smallest float constant and the largest
    tensor rank (shape inference over every value)."""
    import onnx
    from onnx import numpy_helper

    smallest = math.inf
    for _, tensor in _constant_tensors(model):
        array = numpy_helper.to_array(tensor)
        if np.issubdtype(array.dtype, np.floating) and array.size:
            smallest = min(smallest, float(array.min()))
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    ranks = [len(v.type.tensor_type.shape.dim) for v in values if v.type.HasField("tensor_type")]
    ops = Counter(node.op_type for node in model.graph.node)
    return {
        "nodes": len(model.graph.node),
        "ops": dict(sorted(ops.items())),
        "min_constant": None if smallest == math.inf else smallest,
        "max_rank": max(ranks, default=0),
    }


def value_specs(values) -> list[dict]:
    """[{"name", "shape", "dtype"}] of graph inputs/outputs (ValueInfoProto)."""
    import onnx

    return [
        {
            "name": v.name,
            "shape": [d.dim_value for d in v.type.tensor_type.shape.dim],
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
        }
        for v in values
    ]


def session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session (threads 0: ONNX Runtime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run a session on torch inputs (by name) -> torch outputs."""
    feed = {name: tensor.detach().cpu().numpy() for name, tensor in inputs.items()}
    return [torch.from_numpy(np.asarray(out)) for out in sess.run(None, feed)]


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2), capped at SQNR_CAP_DB (exact match)."""
    reference, test = reference.double(), test.double()
    noise = (reference - test).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0:
        return SQNR_CAP_DB
    if signal == 0:
        return -SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10 * math.log10(signal / noise))


def max_abs_diff(reference: torch.Tensor, test: torch.Tensor) -> float:
    return float((reference.double() - test.double()).abs().max()) if reference.numel() else 0.0
