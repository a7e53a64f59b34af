"""The exact rewrites made before decomposing (onnx_cp.graph.fusion): each rule computes what the
input did (checked against onnxruntime on the input model), and refuses where it would not."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_cp import optimize
from onnx_cp.graph.fusion import fuse
from onnx_cp.ranks.search import Timing, plan_frontier
from onnx_cp.settings import LayerSelection

C = 8  # channels of every test block


class Graph:
    """A small graph under construction, weights as Constant nodes (as paddle2onnx writes them)."""

    def __init__(self, seed: int = 0):
        self.nodes: list[onnx.NodeProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def constant(self, array) -> str:
        self.count += 1
        name = f"c{self.count}"
        tensor = numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)
        self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        return name

    def op(self, op_type: str, inputs: list[str], **attributes) -> str:
        self.count += 1
        name = f"v{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=f"{op_type}_{self.count}", **attributes))
        return name

    def conv(self, x: str, kernel: int = 3, group: int = 1, bias: bool = True, weight=None) -> str:
        weight = self.constant(self.rng.standard_normal((C, C // group, kernel, kernel)) * 0.3
                               if weight is None else weight)
        inputs = [x, weight] + ([self.constant(self.rng.standard_normal(C) * 0.1)] if bias else [])
        return self.op("Conv", inputs, kernel_shape=[kernel, kernel], pads=[kernel // 2] * 4, group=group)

    def scale_shift(self, x: str, scale, shift) -> str:
        return self.op("Add", [self.op("Mul", [x, self.constant(scale)]), self.constant(shift)])

    def hardswish_div_last(self, x: str) -> str:  # paddle2onnx's spelling
        clipped = self.op("Clip", [self.op("Add", [x, self.constant(3.0)]), self.constant(0.0), self.constant(6.0)])
        return self.op("Div", [self.op("Mul", [x, clipped]), self.constant(6.0)])

    def hardswish_div_first(self, x: str) -> str:
        clipped = self.op("Clip", [self.op("Add", [x, self.constant(3.0)]), self.constant(0.0), self.constant(6.0)])
        return self.op("Mul", [x, self.op("Div", [clipped, self.constant(6.0)])])

    def model(self, output: str, opset: int = 12, shape=(1, C, 12, 12), output_rank: int = 4) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None] * output_rank)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def lcnet_block_model(opset: int = 12) -> onnx.ModelProto:
    """PP-LCNetV3's pattern: Conv -> learnable scale and shift -> HardSwish -> scale and shift ->
    next Conv, once into an unpadded 1x1 Conv (of rank 2, scaled per channel) and once into a
    padded depthwise one."""
    g = Graph()
    x = g.scale_shift(g.conv("x"), 1.7, -0.2)
    x = g.scale_shift(g.hardswish_div_last(x), 0.8, 0.3)
    rank_2 = (g.rng.standard_normal((C, 2)) @ g.rng.standard_normal((2, C))).reshape(C, C, 1, 1) * 0.3
    x = g.op("Mul", [g.conv(x, kernel=1, weight=rank_2), g.constant(g.rng.uniform(0.5, 1.5, (1, C, 1, 1)))])
    x = g.op("Add", [x, g.constant(g.rng.standard_normal((C, 1, 1)))])
    x = g.scale_shift(g.hardswish_div_first(x), 1.3, 0.4)
    return g.model(g.conv(x, kernel=3, group=C), opset)


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def fused(model: onnx.ModelProto, shapes=None) -> tuple[onnx.ModelProto, Counter]:
    ir_model = ir.from_proto(model)
    applied = fuse(ir_model, shapes)
    return ir.to_proto(ir_model), applied


def assert_same_function(before: onnx.ModelProto, after: onnx.ModelProto, shape=(2, C, 12, 12)) -> None:
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 2
    for expected, actual in zip(run(before, x), run(after, x)):
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")


@pytest.mark.parametrize("opset", [12, 14])
def test_a_lcnet_block_keeps_its_convs_and_loses_its_elementwise_work(opset):
    model = lcnet_block_model(opset)
    after, applied = fused(model)
    # scales: the 1x1 Conv's, and the depthwise one's after its shift moved before it
    assert applied == {"scale_shift_into_conv": 4, "hardswish": 2, "shift_into_next_convs": 1,
                       "scale_into_next_convs": 3}
    counts = op_counts(after)
    assert counts["Conv"] == 3 and counts["Clip"] == 0 and counts["Div"] == 0
    # left: the shift before the padded depthwise Conv (its border sees the shift, not its zeros)
    assert counts["Add"] == 1
    if opset >= 14:
        assert counts["HardSwish"] == 2 and counts["Mul"] == 0
    else:
        assert counts["HardSigmoid"] == 2 and counts["Mul"] == 2
    onnx.checker.check_model(after, full_check=True)
    assert_same_function(model, after)


def test_the_input_model_is_left_as_it_was():
    model = lcnet_block_model()
    before = model.SerializeToString()
    ir_model = ir.from_proto(model)
    fuse(ir_model)
    assert model.SerializeToString() == before


def test_a_folded_graph_output_keeps_its_name():
    g = Graph()
    y = g.op("Sub", [g.op("Div", [g.conv("x"), g.constant(4.0)]), g.constant(np.arange(C).reshape(C, 1, 1))])
    model = g.model(y)
    after, applied = fused(model)
    assert applied == {"scale_shift_into_conv": 2}
    assert op_counts(after) == {"Conv": 1}
    assert [o.name for o in after.graph.output] == [y]
    assert_same_function(model, after)


@pytest.mark.parametrize("case", ["conv output used twice", "constant minus conv", "constant with spatial shape",
                                  "shift before a padded conv", "tensor times tensor", "no hardswish: Clip to 5"])
def test_what_would_change_the_function_is_left_alone(case):
    g = Graph()
    conv = g.conv("x")
    if case == "conv output used twice":
        y = g.op("Add", [g.op("Mul", [conv, g.constant(2.0)]), conv])
    elif case == "constant minus conv":
        y = g.op("Sub", [g.constant(1.0), conv])
    elif case == "constant with spatial shape":
        y = g.op("Mul", [conv, g.constant(g.rng.standard_normal((1, C, 12, 12)))])
    elif case == "shift before a padded conv":
        y = g.conv(g.op("Add", [g.op("Relu", [conv]), g.constant(0.5)]))
    elif case == "tensor times tensor":
        y = g.op("Mul", [conv, g.op("Relu", [conv])])
    else:
        relu = g.op("Relu", [conv])
        clipped = g.op("Clip", [g.op("Add", [relu, g.constant(3.0)]), g.constant(0.0), g.constant(5.0)])
        y = g.op("Div", [g.op("Mul", [relu, clipped]), g.constant(6.0)])
    model = g.model(y)
    after, applied = fused(model)
    assert not applied
    assert op_counts(after) == op_counts(model)


def yolo_dfl_model(opset: int, op_type: str = "Softmax", axis: int = 1) -> onnx.ModelProto:
    """YOLOv8's box decoder: a Softmax over the 16 bins of axis 1 of (N, 16, 4, anchors)."""
    g = Graph()
    y = g.op(op_type, ["x"], axis=axis)
    return g.model(y, opset, shape=(1, 16, 4, 30))


@pytest.mark.parametrize("op_type", ["Softmax", "LogSoftmax"])
def test_a_softmax_over_axis_1_runs_over_the_last_axis(op_type):
    model = yolo_dfl_model(17, op_type)
    after, applied = fused(model)
    assert applied == {"softmax_last_axis": 1}
    assert [n.op_type for n in after.graph.node] == ["Transpose", op_type, "Transpose"]
    assert_same_function(model, after, shape=(3, 16, 4, 30))


def test_a_softmax_of_unknown_rank_is_ranked_by_the_shapes_given():
    model = yolo_dfl_model(17)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    assert not fused(model)[1]
    after, applied = fused(model, {"x": [1, 16, 4, 30]})
    assert applied == {"softmax_last_axis": 1}
    assert_same_function(model, after, shape=(1, 16, 4, 30))


@pytest.mark.parametrize("opset, axis", [(11, 1), (17, -1), (17, 3)])
def test_a_softmax_already_fast_or_of_other_meaning_is_left(opset, axis):
    # before opset 13 the axis flattens the dimensions after it: another function
    assert not fused(yolo_dfl_model(opset, axis=axis))[1]


def test_the_speed_search_counts_speed_ups_from_the_input_model():
    """The rewritten model is what the search decomposes and profiles; a target is counted from the
    input, so the rewrite's own gain (here 1.5x) scales every predicted speed-up."""
    from test_budget import MENUS

    rewritten = Timing(total_ms=14.0, layer_ms={"big": 10.0, "small": 2.0})
    from_input = Timing(total_ms=14.0, layer_ms={"big": 10.0, "small": 2.0}, reference_ms=21.0)
    rest = rewritten.rest_ms(MENUS)
    plain, counted = plan_frontier(MENUS, rewritten, rest), plan_frontier(MENUS, from_input, rest)
    assert plain and [p for _, p in plain] == [p for _, p in counted]
    assert [s * 1.5 for s, _ in plain] == pytest.approx([s for s, _ in counted])


def test_optimize_writes_the_rewrites_even_when_nothing_is_decomposed(tmp_path):
    model = lcnet_block_model()
    result = optimize(model, layers=LayerSelection(include="^$"))
    assert result.report["fusions"] == {"scale_shift_into_conv": 4, "hardswish": 2, "shift_into_next_convs": 1,
                                        "scale_into_next_convs": 3}
    assert result.report["totals"]["decomposed"] == 0
    assert result.report["verification"]["max_rel_error"] < 1e-4
    assert op_counts(result.model)["Clip"] == 0
    assert_same_function(model, result.model)

    untouched = optimize(model, layers=LayerSelection(include="^$", fuse=False))
    assert "fusions" not in untouched.report and untouched.report["settings"]["fuse"] is False
    assert op_counts(untouched.model) == op_counts(model)


def test_optimize_decomposes_the_folded_kernel():
    """An exact SVD (rank 2) of the 1x1 Conv whose output scale and shift were folded into it: the
    written model computes what the input did, so the chain was made from the folded kernel."""
    from onnx_cp.ranks import SolverSettings

    model = lcnet_block_model()
    pointwise = next(n.name for n in model.graph.node if n.op_type == "Conv"
                     and {a.name: list(a.ints) for a in n.attribute}["kernel_shape"] == [1, 1])
    result = optimize(model, 2, layers=LayerSelection(include=f"^{pointwise}$"),
                      solver=SolverSettings(decomposition="svd"))
    assert [row["name"] for row in result.report["layers"] if row["status"] == "decomposed"] == [pointwise]
    assert result.report["fusions"]["scale_shift_into_conv"] == 4
    assert result.report["verification"]["max_rel_error"] < 1e-4
    assert_same_function(model, result.model)


def test_the_cli_reports_the_rewrites_and_no_fuse_skips_them(tmp_path, capsys):
    from onnx_cp.cli import main

    source, report = tmp_path / "in.onnx", tmp_path / "r.json"
    onnx.save(lcnet_block_model(), source)
    assert main(["optimize", str(source), str(tmp_path / "a.onnx"), "--layers", "^$"]) == 0
    out = capsys.readouterr().out
    assert "exact rewrites first: 4 scale_shift_into_conv" in out and "the exact rewrites alone were written" in out
    assert main(["optimize", str(source), str(tmp_path / "b.onnx"), "--layers", "^$", "--no-fuse",
                 "--report", str(report), "-q"]) == 0
    written = json.loads(report.read_text())
    assert written["settings"]["fuse"] is False and "fusions" not in written
    assert op_counts(onnx.load(tmp_path / "b.onnx")) == op_counts(lcnet_block_model())


def test_a_hardswish_of_clip_attributes_before_opset_11():
    g = Graph()
    x = g.op("Relu", [g.conv("x")])
    clipped = g.op("Clip", [g.op("Add", [x, g.constant(3.0)])], min=0.0, max=6.0)
    y = g.op("Mul", [g.op("Mul", [x, clipped]), g.constant(np.float32(1 / 6))])
    model = g.model(y, opset=10)
    after, applied = fused(model)
    assert applied == {"hardswish": 1}
    assert op_counts(after) == {"Conv": 1, "Relu": 1, "HardSigmoid": 1, "Mul": 1}
    assert_same_function(model, after)
