"""Parity of the interpreter's LSTM and GRU with onnxruntime (single-node graphs and a torch-exported
CRNN-like model), their gradients into W and R, and the clear refusals of what is unsupported."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import model_factory
from onnx_cp.errors import OnnxCpError
from onnx_cp.finetune import to_torch
from onnx_cp.finetune.ops import supported_ops

torch.set_num_threads(1)
RTOL = 1e-4
SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6
GATES = {"LSTM": 4, "GRU": 3}
OUTPUTS = {"LSTM": ("Y", "Y_h", "Y_c"), "GRU": ("Y", "Y_h")}


def _rand(*shape, seed=1, scale=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def rnn_model(op, direction="forward", layout=0, bias=True, initial=False, lens=None,
              peepholes=False, outputs=None, attrs=None, opset=17):
    """One LSTM/GRU node; X (and sequence_lens when `lens` is given) are graph inputs, the
    weights initializers. `outputs` lists the requested outputs (others get empty names)."""
    num_dir = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    inits = {
        "W": _rand(num_dir, gates * HIDDEN, INPUT, seed=2),
        "R": _rand(num_dir, gates * HIDDEN, HIDDEN, seed=3),
    }
    if bias:
        inits["B"] = _rand(num_dir, 2 * gates * HIDDEN, seed=4)
    if initial:  # the same numbers in either layout
        def state(seed):
            value = _rand(num_dir, BATCH, HIDDEN, seed=seed)
            return np.ascontiguousarray(value.transpose(1, 0, 2)) if layout else value
        inits["initial_h"] = state(5)
        if op == "LSTM":
            inits["initial_c"] = state(6)
    if peepholes:
        inits["P"] = _rand(num_dir, 3 * HIDDEN, seed=7)
    slots = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"][:8 if op == "LSTM" else 6]
    names = [s if s in inits or s in ("X", "W", "R") or (s == "sequence_lens" and lens is not None)
             else "" for s in slots]
    while names[-1] == "":
        names.pop()
    wanted = outputs or OUTPUTS[op]
    out_names = [o if o in wanted else "" for o in OUTPUTS[op]]
    while out_names[-1] == "":
        out_names.pop()
    node_attrs = {"hidden_size": HIDDEN, "direction": direction, **(attrs or {})}
    if layout:
        node_attrs["layout"] = 1
    node = helper.make_node(op, names, out_names, name=f"{op.lower()}_node", **node_attrs)
    x_shape = [BATCH, SEQ, INPUT] if layout else [SEQ, BATCH, INPUT]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    if lens is not None:
        graph_inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, [BATCH]))
    graph = helper.make_graph(
        [node], op, graph_inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in out_names if o],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = model_factory.make_model(graph, opset)
    model.ir_version = 10
    return model


def _feeds(model, lens=None):
    x = _rand(SEQ, BATCH, INPUT, seed=11, scale=1.0)
    if _layout(model):
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    feeds = {"X": x}
    if lens is not None:
        feeds["sequence_lens"] = np.array(lens, dtype=np.int32)
    return feeds


def _compare(got, expected, names):
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected) == len(names)
    for name, g, e in zip(names, got, expected):
        g = g.detach().numpy()
        assert g.shape == e.shape, (name, g.shape, e.shape)
        err = float(np.abs(g.astype(np.float64) - e).max()) / max(float(np.abs(e).max()), 1e-6)
        assert err <= RTOL, f"{name}: relative error {err:.2e}"


def _layout(model) -> int:
    return next((a.i for a in model.graph.node[-1].attribute if a.name == "layout"), 0)


def _ort_run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _expected(op, lens=None, **kwargs):
    """onnxruntime's outputs; onnxruntime refuses layout=1, so for it run the layout-0 twin
    and bring the results to the batch-first layout."""
    if not kwargs.get("layout"):
        model = rnn_model(op, lens=lens, **kwargs)
        return _ort_run(model, _feeds(model, lens))
    twin = rnn_model(op, lens=lens, **{**kwargs, "layout": 0})
    results = _ort_run(twin, _feeds(twin, lens))
    perms = {"Y": (2, 0, 1, 3), "Y_h": (1, 0, 2), "Y_c": (1, 0, 2)}
    return [r.transpose(perms[o.name]) for r, o in zip(results, twin.graph.output)]


def assert_rnn_parity(op, lens=None, **kwargs):
    model = rnn_model(op, lens=lens, **kwargs)
    feeds = _feeds(model, lens)
    expected = _expected(op, lens, **kwargs)
    module = to_torch(model).eval()
    with torch.no_grad():
        got = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    _compare(got, expected, [o.name for o in model.graph.output])


LSTM_CASES = {
    "forward": {},
    "reverse": {"direction": "reverse"},
    "bidirectional": {"direction": "bidirectional"},
    "no_bias": {"bias": False},
    "no_bias_bidirectional_initial": {"direction": "bidirectional", "bias": False, "initial": True},
    "initial_states": {"initial": True},
    "reverse_initial": {"direction": "reverse", "initial": True},
    "layout1": {"layout": 1},
    "layout1_bidirectional_initial": {"layout": 1, "direction": "bidirectional", "initial": True},
    "only_y_h": {"outputs": ("Y_h",)},
    "only_y_c_bidirectional": {"outputs": ("Y_c",), "direction": "bidirectional"},
    "only_y": {"outputs": ("Y",), "direction": "reverse"},
    "peepholes": {"peepholes": True, "initial": True},
    "peepholes_bidirectional": {"peepholes": True, "direction": "bidirectional"},
    "opset22": {"direction": "bidirectional", "opset": 22},
    "default_activations_listed": {
        "direction": "bidirectional",
        "attrs": {"activations": ["Sigmoid", "Tanh", "Tanh"] * 2},
    },
}
GRU_CASES = {
    "forward": {},
    "reverse_initial": {"direction": "reverse", "initial": True},
    "no_bias": {"bias": False},
    "bidirectional": {"direction": "bidirectional"},
    "linear_before_reset": {"attrs": {"linear_before_reset": 1}},
    "linear_before_reset_bidirectional": {
        "direction": "bidirectional", "initial": True, "attrs": {"linear_before_reset": 1}},
    "linear_before_reset_no_bias": {"bias": False, "attrs": {"linear_before_reset": 1}},
    "layout1_bidirectional": {"layout": 1, "direction": "bidirectional", "initial": True},
    "only_y_h": {"outputs": ("Y_h",), "direction": "bidirectional"},
}


@pytest.mark.parametrize("name", sorted(LSTM_CASES))
def test_lstm_parity(name):
    assert_rnn_parity("LSTM", **LSTM_CASES[name])


@pytest.mark.parametrize("name", sorted(GRU_CASES))
def test_gru_parity(name):
    assert_rnn_parity("GRU", **GRU_CASES[name])


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("lens", [[SEQ] * BATCH, [SEQ, 2, 1]])
@pytest.mark.parametrize("layout", [0, 1])
def test_sequence_lens_parity(op, lens, layout):
    assert_rnn_parity(op, lens, direction="bidirectional", layout=layout, initial=True)


def test_rnn_outputs_match_requested_slots():
    """Only Y_h requested: the interpreter's only output is Y_h's [num_dir, batch, hidden]."""
    model = rnn_model("LSTM", direction="bidirectional", outputs=("Y_h",))
    assert list(model.graph.node[0].output) == ["", "Y_h"]
    got = to_torch(model).eval()(torch.from_numpy(_feeds(model)["X"]))
    assert tuple(got.shape) == (2, BATCH, HIDDEN)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_rnn_gradients_reach_w_and_r(op):
    model = rnn_model(op, direction="bidirectional", initial=True)
    module = to_torch(model).train()
    params = module.onnx_parameters()
    assert {"W", "R", "B"} <= set(params)
    outputs = module(torch.from_numpy(_feeds(model)["X"]))
    loss = sum((o ** 2).sum() for o in outputs)
    loss.backward()
    for name in ("W", "R", "B"):
        grad = params[name].grad
        assert grad is not None, name
        for d in range(2):  # both directions learn
            assert float(grad[d].abs().sum()) > 0, (name, d)
    # The gradient is the right one: compare one entry of W's with a finite difference.
    with torch.no_grad():
        base = sum((o.double() ** 2).sum() for o in module(torch.from_numpy(_feeds(model)["X"])))
        eps = 1e-2
        params["W"][1, 2, 3] += eps
        bumped = sum((o.double() ** 2).sum() for o in module(torch.from_numpy(_feeds(model)["X"])))
        params["W"][1, 2, 3] -= eps
    numeric = float(bumped - base) / eps
    assert abs(numeric - float(params["W"].grad[1, 2, 3])) <= 0.05 * max(abs(numeric), 1.0)


@pytest.mark.parametrize(("op", "attrs", "message"), [
    ("LSTM", {"clip": 3.0}, "attribute clip is not supported"),
    ("GRU", {"clip": 3.0}, "attribute clip is not supported"),
    ("LSTM", {"input_forget": 1}, "attribute input_forget=1 is not supported"),
    ("LSTM", {"activations": ["Sigmoid", "Relu", "Tanh"]}, r"activations \['Sigmoid', 'Relu', 'Tanh'\]"),
    ("GRU", {"activations": ["HardSigmoid", "Tanh"]}, r"activations \['HardSigmoid', 'Tanh'\]"),
    ("GRU", {"activation_alpha": [0.5]}, "attribute activation_alpha is not supported"),
])
def test_rnn_unsupported_attributes_are_clear_errors(op, attrs, message):
    model = rnn_model(op, attrs=attrs)
    module = to_torch(model)
    with pytest.raises(OnnxCpError, match=f"{op} node '{op.lower()}_node': {message}"):
        module(torch.from_numpy(_feeds(model)["X"]))


def test_rnn_ops_are_listed_as_supported():
    assert {"LSTM", "GRU"} <= set(supported_ops())


class _CRNN(nn.Module):
    """Conv features -> columns as a sequence -> bidirectional recurrent layer -> per-step classes."""

    def __init__(self, rnn: type[nn.Module]):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.rnn = rnn(4 * 4, 8, bidirectional=True)
        self.fc = nn.Linear(16, 7)

    def forward(self, x):
        f = self.conv(x)  # [N, 4, 4, W/2]
        n, c, h, w = f.shape
        seq = f.permute(3, 0, 1, 2).reshape(w, n, c * h)  # [W/2, N, C*H]
        y, _ = self.rnn(seq)
        return self.fc(y)  # [W/2, N, classes]


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's deprecation and tracer notes
@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_torch_exported_crnn_parity(rnn):
    torch.manual_seed(0)
    net = _CRNN(rnn).eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(2, 1, 8, 12),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {1: "N"}})
    model = onnx.load_from_string(buffer.getvalue())
    assert rnn.__name__ in {n.op_type for n in model.graph.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    module = to_torch(model).eval()
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 1, 8, 12)).astype(np.float32)
        expected = session.run(None, {"x": x})
        with torch.no_grad():
            got = module(torch.from_numpy(x))
            reference = net(torch.from_numpy(x))
        _compare(got, expected, ["logits"])
        _compare(got, [reference.numpy()], ["torch"])
    # Fine-tuning reaches the recurrent weights through the exported graph.
    module.train()
    module(torch.from_numpy(x)).square().sum().backward()
    rnn_node = next(n for n in model.graph.node if n.op_type == rnn.__name__)
    params = module.onnx_parameters()
    for name in rnn_node.input[1:3]:
        assert float(params[name].grad.abs().sum()) > 0, name
