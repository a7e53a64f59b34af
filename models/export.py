"""Export a trained torch model to one self-contained ONNX file (opset 18, IR 10, symbolic batch)
and check that onnxruntime reproduces torch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

OPSET = 18
IR_VERSION = 10  # onnxruntime 1.32 refuses newer IR versions that onnx 1.23 may stamp


def _global_average_pool(model: onnx.ModelProto) -> None:
    """Replace ReduceMean over axes (2, 3) with keepdims by the equivalent GlobalAveragePool,
    the op that CNNs exported by most tools carry."""
    graph = model.graph
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            consts[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Constant" and node.attribute[0].name == "value_ints":
            consts[node.output[0]] = np.array(node.attribute[0].ints)
    for idx, node in enumerate(list(graph.node)):
        if node.op_type != "ReduceMean" or len(node.input) != 2:
            continue
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        axes = consts.get(node.input[1])
        if keep == 1 and axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]:
            gap = helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output),
                                   name=node.name or "global_average_pool")
            graph.node.remove(node)
            graph.node.insert(idx, gap)


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-code removal only: onnxscript's full optimizer (the exporter's
    optimize=True) also runs rewrite rules, one of which fuses Conv + BatchNormalization."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnx_ir.passes import common

    model = ir.serde.deserialize_model(proto)
    onnxscript.optimizer.fold_constants(model)
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedOpsetsPass()(model)
    return ir.serde.serialize_model(model)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _name_layers(model: onnx.ModelProto) -> None:
    """Name Conv/Gemm/BatchNormalization nodes after their torch module ("conv2",
    "stage2.conv2", "stage2.conv2.bn", "fc") instead of the exporter's "node_conv2d_1": these names
    appear in every onnx-cp report and in the CP chain names ("conv2/cp/in")."""
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "BatchNormalization") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if not weight.endswith(".weight"):
            continue
        module = weight[: -len(".weight")]
        if node.op_type == "BatchNormalization":
            module = module.rsplit(".", 1)[0] + ".bn" if module.endswith(".1") else module
        elif module.endswith(".0"):
            module = module[:-2]  # nn.Sequential(conv, bn): the conv is item 0
        node.name = module


def export_onnx(model: torch.nn.Module, out: Path) -> onnx.ModelProto:
    model.eval()
    example = torch.randn(2, 1, 24, 24)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model, (example,), str(raw), input_names=["x"], output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=OPSET,
            dynamo=True, optimize=False)
        proto = onnx.load(str(raw), load_external_data=True)
    # the exporter's optimizer would fold BatchNormalization into Conv: run it without that
    proto = _simplify(proto)
    _global_average_pool(proto)
    _drop_unused_initializers(proto)
    _name_layers(proto)
    proto.ir_version = IR_VERSION
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp.onnx")
    onnx.save(proto, str(tmp_out), save_as_external_data=False)
    tmp_out.replace(out)
    _check_against_torch(model, out)
    return proto


@torch.no_grad()
def _check_against_torch(model: torch.nn.Module, path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(7, 1, 24, 24)).astype(np.float32)
    expected = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"x": x})
    err = float(np.abs(got - expected).max())
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"onnxruntime differs from torch: max abs error {err}")
    print(f"onnxruntime == torch on a batch of 7 (max abs error {err:.2e})", flush=True)
