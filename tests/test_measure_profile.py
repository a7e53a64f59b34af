"""Per-layer profiles: kernels of the optimised graph map back to the model's layers, and a CP
chain's four convs count for the layer they replaced."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import model_factory
from onnx_cp.graph.naming import LAYER_METADATA_KEY, node_name, weight_name
from onnx_cp.measure import layer_profile
from onnx_cp.measure.profile import REORDER, NodeMapper, format_profile
from onnx_cp.settings import LayerSelection, MeasureSettings, SolverSettings

LAYERS = ["conv1", "conv2", "gap", "flatten", "fc"]


def chain_cnn(rank: int = 16, seed: int = 0, c: int = 16, batch="N"):
    """tiny_cnn's architecture with conv2 as a hand-built CP chain, named as CONTRACT.md says."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("conv1.weight", c, 3, 3, 3), init("conv1.bias", c),
        init(weight_name("conv2", "in"), rank, c, 1, 1),
        init(weight_name("conv2", "vertical"), rank, 1, 5, 1),
        init(weight_name("conv2", "horizontal"), rank, 1, 1, 5),
        init(weight_name("conv2", "out"), 2 * c, rank, 1, 1),
        init("conv2.bias", 2 * c), init("fc.weight", 10, 2 * c), init("fc.bias", 10),
    ]

    def stage(name, inputs, output, **attrs):
        node = helper.make_node("Conv", inputs, [output], name=node_name("conv2", name), **attrs)
        node.metadata_props.add(key=LAYER_METADATA_KEY, value="conv2")
        return node

    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        stage("in", ["r1", weight_name("conv2", "in")], "t_in"),
        stage("vertical", ["t_in", weight_name("conv2", "vertical")], "t_v", group=rank,
              pads=[2, 0, 2, 0]),
        stage("horizontal", ["t_v", weight_name("conv2", "horizontal")], "t_h", group=rank,
              pads=[0, 2, 0, 2]),
        stage("out", ["t_h", weight_name("conv2", "out"), "conv2.bias"], "c2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "chain_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits,
    )
    return model_factory.make_model(graph)


@pytest.mark.parametrize("optimization", ["all", "basic", "none"])
def test_chain_counts_under_the_layer_it_replaced(optimization):
    profile = layer_profile(chain_cnn(), runs=3, warmup=1, optimization=optimization)
    names = [layer.name for layer in profile.layers]
    assert not any("/cp/" in name for name in names)
    assert names.count("conv2") == 1
    assert set(LAYERS) <= set(names) <= set(LAYERS) | {"relu1", "relu2", REORDER}
    conv2 = next(layer for layer in profile.layers if layer.name == "conv2")
    if optimization == "none":  # nothing fused: exactly the four chain convs
        assert conv2.kernels == sorted(node_name("conv2", s)
                                          for s in ("in", "vertical", "horizontal", "out"))
    else:  # fused / NCHWc kernels, several of them
        assert len(conv2.kernels) >= 3
    assert profile.runs == 3
    assert profile.total_ms > 0
    assert sum(layer.ms for layer in profile.layers) == pytest.approx(profile.total_ms, rel=0.5)
    assert abs(sum(layer.share for layer in profile.layers) - 1) < 0.5
    assert "conv2" in format_profile(profile)


def test_chain_from_the_rewrite_pass_counts_under_one_layer():
    import onnx_cp

    def random_factors(kernel, rank):  # profiling needs the structure, not a good fit
        rng = np.random.default_rng(0)
        return [rng.standard_normal((n, rank)) for n in kernel.shape]

    result = onnx_cp.optimize(model_factory.tiny_cnn(), 16, layers=LayerSelection("conv2"),
                              solver=SolverSettings(decomposer=random_factors), measure=MeasureSettings(verify=False))
    assert sum("/cp/" in n.name for n in ir.from_proto(result.model).graph) == 4
    profile = layer_profile(result.model, runs=2, warmup=1)
    names = [layer.name for layer in profile.layers]
    assert names[:2] == ["conv1", "conv2"]
    assert not any("/cp/" in name for name in names)


def test_graph_order_with_reorder_last_and_batch_applied():
    profile = layer_profile(model_factory.tiny_cnn(), runs=2, warmup=0, batch=2)
    names = [layer.name for layer in profile.layers]
    known = [n for n in names if n in LAYERS]
    assert known == [n for n in LAYERS if n in known]
    if REORDER in names:
        assert names[-1] == REORDER
    assert profile.input_shapes == {"x": [2, 3, 16, 16]}


def test_unnamed_nodes_get_a_row_of_their_own():
    model = model_factory.tiny_cnn()
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.name = ""
    profile = layer_profile(model, runs=2, warmup=0, optimization="none")
    names = {layer.name for layer in profile.layers}
    assert {"Relu_1", "Relu_3"} <= names


def _mapper():
    return NodeMapper(ir.from_proto(chain_cnn()))


@pytest.mark.parametrize("kernel, op, layer", [
    ("conv1", "Conv", "conv1"),                      # unchanged name
    ("r1_nchwc", "Conv", "conv1"),                   # Conv+Relu fused, named after Relu's output
    ("r2_nchwc", "Conv", "conv2"),                   # ... the chain's last conv fused with relu2
    ("t_v_nchwc", "Conv", "conv2"),                  # an NCHWc chain stage, named after its output
    ("conv2/cp/in_token_7", "Conv", "conv2"),        # a transformer's suffix on a chain node
    ("g_nchwc", "GlobalAveragePool", "gap"),
    ("conv1", "FusedConv", "conv1"),
    ("r1", "FusedConv", "conv1"),                    # a FusedConv named after its output
    ("ReorderOutput", "ReorderOutput", REORDER),
    ("ReorderInput_3", "ReorderInput", REORDER),
    ("made_up_by_ort", "Transpose", "made_up_by_ort"),  # unknown: kept under its own name
])
def test_kernel_names_map_back(kernel, op, layer):
    assert _mapper().layer(kernel, op) == layer


def test_fused_residual_add_is_attributed_to_its_conv():
    """ORT fuses Conv + BatchNormalization + Add + Relu into one NCHWc conv named after a value."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="stem_relu"),
        helper.make_node("Conv", ["ra", "w1"], ["b"], name="block_conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["b", "s", "bb", "m", "v"], ["bn"], name="block_bn"),
        helper.make_node("Add", ["bn", "ra"], ["sum"], name="block_add"),
        helper.make_node("Relu", ["sum"], ["y"], name="block_relu"),
    ]
    inits = [w("w0", 16, 16, 3, 3), w("w1", 16, 16, 3, 3), w("s", 16), w("bb", 16), w("m", 16),
             numpy_helper.from_array(np.ones(16, np.float32), "v")]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           [1, 16, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = model_factory.make_model(graph)
    mapper = NodeMapper(ir.from_proto(model))
    assert mapper.layer("bn_nchwc", "Conv") == "block_conv"
    assert mapper.layer("y_nchwc", "Conv") == "block_conv"
    names = [layer.name for layer in layer_profile(model, runs=2, warmup=0).layers]
    assert names[:2] == ["stem", "block_conv"]


def test_longest_name_wins_at_a_boundary():
    nodes = [helper.make_node("Relu", ["x"], [f"y{i}"], name=name) for i, name in
             enumerate(["conv1", "conv10", "conv1_extra"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [1])])
    mapper = NodeMapper(ir.from_proto(model_factory.make_model(graph)))
    assert mapper.layer("conv10_token_2", "Relu") == "conv10"
    assert mapper.layer("conv1_token_2", "Relu") == "conv1"
    assert mapper.layer("conv1_extra_nchwc", "Relu") == "conv1_extra"
    assert mapper.layer("conv1x", "Relu") == "conv1x"  # no boundary: not conv1
