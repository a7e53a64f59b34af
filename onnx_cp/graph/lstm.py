"""An LSTM as a site: its recurrence is one matrix, and a low-rank recurrence is spliced as the
LSTM unrolled over its (static) time steps.

Why: at batch 1 an LSTM's time goes to its recurrence, one (4H x H) matrix-vector product per step
and direction that reads the whole matrix each time (a CRNN recogniser's bidirectional 512-unit
LSTM: half of the model's 21 ms, 9.4 ms of its LSTM's 10.4 ms [AVX-512 VNNI, AMX]). The ONNX LSTM
op has no way to take that matrix in factors, so the splice writes the LSTM out step by step:

    gates_k = X_k W^T + b + (h_{k-1} V) U        (V: DH x r, U: r x 4DH)
    i, o, f = sigmoid, c~ = tanh (of the gates' four blocks); C_k = f C_{k-1} + i c~; h_k = o tanh(C_k)

Both directions of a bidirectional LSTM run in lockstep (step k reads time k forwards and time
T-1-k backwards) on the joint state h = [h_fw, h_bw] (N x DH), and the site's kernel is the joint
recurrence: block-diagonal, rows in the order (gate, direction, unit), columns (direction, unit).
Any rank-r factors of it are exact in this splice; its truncated SVD shares the rank out between
the directions by their singular values, and with the states' Gram matrix within directions
(ranks/output_error.py) it is the rank-r recurrence that moves the gates least on that data. Such
factors keep every component in one direction, and each direction's states then go through its
own V_d and U_d (direction_factors).

On that CRNN, with only its LSTM decomposed, rank 304 measured 1.37x [AVX-512 VNNI, AMX] and
kept 95.1% of 512 held-out lines' decoded strings (benchmarks/results/real_models_notes.md).

Only the LSTM the ONNX standard defines by default is taken: sigmoid/tanh/tanh, no clip, no
peepholes, no input_forget, no sequence_lens, time-major layout, and a sequence length the model's
shapes fix (a symbolic length cannot be unrolled).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_cp.graph import naming
from onnx_cp.graph.constants import constant_array, new_initializer

FORM_NAME = "lstm"  # the unrolled nodes' name part: <layer>/lstm/<step>..., not a chain reconstruction knows
MAX_STEPS = 512  # more steps would add thousands of nodes
_DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")
_GATES = 4  # ONNX order: input, output, forget, cell


def directions(node: ir.Node) -> list[str]:
    attr = node.attributes.get("direction")
    direction = attr.as_string() if attr is not None else "forward"
    return ["forward", "reverse"] if direction == "bidirectional" else [direction]


def lstm_refusal(node: ir.Node, main_graph: ir.Graph, steps: int | None) -> str | None:
    """Why this LSTM's recurrence cannot be spliced in factors (None if it can)."""
    if node.graph is not main_graph:
        return "inside a subgraph (If/Loop/Scan body): left unchanged"
    opset = main_graph.opset_imports.get("", 1)
    if opset < 10:
        return f"opset {opset}: the unrolled LSTM needs opset 10 or later"
    attrs = node.attributes
    if "activations" in attrs:
        names = [n.lower() for n in attrs["activations"].as_strings()]
        if names != [n.lower() for n in _DEFAULT_ACTIVATIONS] * len(directions(node)):
            return f"activations {names}: only the default sigmoid/tanh/tanh LSTM is unrolled"
    for name, default in (("clip", None), ("input_forget", 0), ("layout", 0)):
        if name in attrs and attrs[name].value != default:
            return f"{name}={attrs[name].value}: only the default LSTM is unrolled"
    if directions(node)[0] not in ("forward", "reverse"):
        return f"direction {directions(node)[0]!r}: not an LSTM direction"
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    if inputs[4] is not None:
        return "sequence_lens given: steps past a sequence's end are not unrolled"
    if inputs[7] is not None:
        return "peephole weights: not unrolled"
    if not node.outputs or not node.outputs[0].name:
        return "no Y output: the states the recurrence sees cannot be read"
    for index, label in ((1, "W"), (2, "R")):
        array = constant_array(inputs[index]) if inputs[index] is not None else None
        if array is None or array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
            return f"{label} is not a constant float tensor"
        if not np.all(np.isfinite(array)):
            return f"{label} holds NaN or infinity"
    if inputs[3] is not None and constant_array(inputs[3]) is None:
        return "B is not a constant"
    if steps is None:
        return "sequence length not fixed by the model's shapes (give --input-shape)"
    if steps > MAX_STEPS:
        return f"{steps} time steps: unrolled, it would add {steps * 13} nodes"
    return None


def sequence_length(node: ir.Node, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """T of the LSTM's input X (T, N, I), when the shapes (or X's own shape) fix it."""
    return _input_dim(node, shapes, 0)


def batch_size(node: ir.Node, shapes: Mapping[str, Sequence[int]]) -> int | None:
    return _input_dim(node, shapes, 1)


def _input_dim(node: ir.Node, shapes: Mapping[str, Sequence[int]], axis: int) -> int | None:
    x = node.inputs[0] if node.inputs else None
    if x is None:
        return None
    shape = shapes.get(x.name)
    if shape is None and x.shape is not None:
        shape = [d if isinstance(d, int) else None for d in x.shape.dims]
    if shape is None or len(shape) != 3 or not isinstance(shape[axis], int) or shape[axis] <= 0:
        return None
    return int(shape[axis])


def joint_recurrence(recurrence: np.ndarray) -> np.ndarray:
    """R (D, 4H, H) as the joint (4DH, DH) matrix: rows (gate, direction, unit), columns (direction,
    unit), zero between directions."""
    d, four_h, h = recurrence.shape
    joint = np.zeros((_GATES, d, h, d, h), recurrence.dtype)
    for k in range(d):
        joint[:, k, :, k, :] = recurrence[k].reshape(_GATES, h, h)
    return joint.reshape(_GATES * d * h, d * h)


def joint_input_weights(weights: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per direction W^T (D, I, 4H) with its columns in gate order, and the joint bias Wb + Rb (4DH,)
    in the joint order."""
    d, four_h, _ = weights.shape
    h = four_h // _GATES
    bias = np.zeros((d, 2 * four_h), weights.dtype) if bias is None else bias.reshape(d, 2 * four_h)
    summed = (bias[:, :four_h] + bias[:, four_h:]).reshape(d, _GATES, h)
    return np.ascontiguousarray(weights.transpose(0, 2, 1)), np.ascontiguousarray(summed.transpose(1, 0, 2).reshape(-1))


def joint_previous_states(y: np.ndarray, reverse: Sequence[bool]) -> np.ndarray:
    """The joint states the recurrence reads at steps 1..T-1, as rows ((T-1) N, DH), from the LSTM's
    Y (T, D, N, H) (the first step reads the initial state): step k reads time k-1 of a forward
    direction and time T-k of a reverse one."""
    t, d, _, h = y.shape
    steps = [np.concatenate([y[t - k if back else k - 1, j] for j, back in enumerate(reverse)], axis=-1)
             for k in range(1, t)]
    return np.concatenate(steps) if steps else np.zeros((0, d * h), y.dtype)


DIRECTION_LEAK = 1e-8  # relative energy outside a component's direction that still counts as rounding


def within_directions(gram: np.ndarray, d: int) -> np.ndarray:
    """The joint states' Gram matrix (DH, DH) without its blocks between directions. The recurrence
    is block-diagonal, and so is any approximation the splice multiplies per direction, so the
    error D makes, tr(D G D^T), reads only the blocks within a direction; solved against this Gram,
    the SVD keeps to those blocks too, as direction_factors needs."""
    h = gram.shape[0] // d
    masked = np.zeros_like(gram)
    for k in range(d):
        masked[k * h:(k + 1) * h, k * h:(k + 1) * h] = gram[k * h:(k + 1) * h, k * h:(k + 1) * h]
    return masked


def direction_factors(v: np.ndarray, u: np.ndarray, d: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The joint factors (V: DH x r, U: r x 4DH, rows (gate, direction, unit)) as each direction's
    own (V_d: H x r_d, U_d: r_d x 4H) when every rank component lies within one direction (the SVD
    of the block-diagonal recurrence, with or without within_directions' Gram, up to rounding);
    None when some component spans directions. Why: each step then reads r_d x (H + 4H) numbers per
    direction where the joint factors read r x (DH + 4DH), half of them zeros, and a step's factors
    are read from beyond this core's 2 MB L2 cache every time (the CRNN's r = 176: a (176 x 4096)
    product takes 84 us a step, two (88 x 2048) ones 13 us; at rank 240 the model with the joint V
    measured 1.35x, with each direction's V_d 1.43x [AVX-512 VNNI, AMX])."""
    if d == 1:
        return [(v, u)]
    h = v.shape[0] // d
    v_energy = np.stack([np.square(v[k * h:(k + 1) * h]).sum(0) for k in range(d)])  # (D, r)
    u_rows = u.reshape(u.shape[0], _GATES, d, h)
    u_energy = np.stack([np.square(u_rows[:, :, k]).sum((1, 2)) for k in range(d)])  # (D, r)
    owner = np.argmax(v_energy, axis=0)
    for energy in (v_energy, u_energy):
        own = energy[owner, np.arange(energy.shape[1])]
        if np.any(energy.sum(0) - own > DIRECTION_LEAK * np.maximum(own, np.finfo(np.float64).tiny)):
            return None
    factors = []
    for k in range(d):
        mine = np.flatnonzero(owner == k)
        factors.append((v[k * h:(k + 1) * h][:, mine], u_rows[mine][:, :, k].reshape(len(mine), _GATES * h)))
    return factors


class _Builder:
    """Nodes and constants of one unrolled LSTM, named <layer>/lstm/<label> and tagged with the layer."""

    def __init__(self, graph: ir.Graph, layer: str, dtype: np.dtype) -> None:
        self.graph, self.layer, self.dtype = graph, layer, dtype
        self.nodes: list[ir.Node] = []
        self.opset = graph.opset_imports.get("", 1)

    def const(self, label: str, array: np.ndarray) -> ir.Value:
        name = f"{self.layer}{naming.separator(FORM_NAME)}{label}"
        while name in self.graph.initializers:
            name += "_"
        return new_initializer(self.graph, name, array)

    def ints(self, label: str, values) -> ir.Value:
        return self.const(label, np.asarray(values, np.int64))

    def op(self, op: str, label: str, inputs: Sequence[ir.Value | None], count: int = 1,
           **attributes) -> list[ir.Value]:
        name = f"{self.layer}{naming.separator(FORM_NAME)}{label}"
        node = ir.node(op, list(inputs), attributes, num_outputs=count, name=name,
                       metadata_props={naming.LAYER_METADATA_KEY: self.layer})
        for i, value in enumerate(node.outputs):
            value.name = f"{name}.output" if count == 1 else f"{name}.output{i}"
        self.nodes.append(node)
        return list(node.outputs)

    def one(self, op: str, label: str, inputs: Sequence[ir.Value | None], **attributes) -> ir.Value:
        return self.op(op, label, inputs, **attributes)[0]

    def reversed_in_time(self, label: str, value: ir.Value) -> ir.Value:
        return self.one("Slice", label, [value, self.ints(label + ".starts", [-1]),
                                         self.ints(label + ".ends", [np.iinfo(np.int64).min]),
                                         self.ints(label + ".axes", [0]), self.ints(label + ".steps", [-1])])

    def split4(self, label: str, value: ir.Value) -> list[ir.Value]:
        attrs = {"num_outputs": _GATES} if self.opset >= 18 else {}  # else split equally by default
        return self.op("Split", label, [value], _GATES, axis=1, **attrs)


def splice_unrolled(graph: ir.Graph, layer: str, node: ir.Node, steps: int, weights: Sequence[ir.Value]) -> None:
    """Replace the LSTM `node` by itself unrolled over `steps` time steps, its joint recurrence the
    product of the two matrices `weights` (V: DH x r, then U: r x 4DH); outputs keep their values'
    places in the graph."""
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    w = constant_array(inputs[1])
    bias = constant_array(inputs[3]) if inputs[3] is not None else None
    back = [d == "reverse" for d in directions(node)]
    d, hidden = len(back), w.shape[1] // _GATES
    b = _Builder(graph, layer, w.dtype)
    w_t, joint_bias = joint_input_weights(w, bias)
    projections = []
    for j in range(d):
        p = b.one("MatMul", f"x{j}", [node.inputs[0], b.const(f"w{j}", w_t[j])])  # (T, N, 4H)
        if back[j]:
            p = b.reversed_in_time(f"x{j}.reversed", p)
        projections.append(p)
    if d > 1:
        parts = [b.one("Reshape", f"x{j}.gates", [p, b.ints(f"x{j}.shape", [0, 0, _GATES, 1, hidden])])
                 for j, p in enumerate(projections)]
        joint = b.one("Concat", "x.joint", parts, axis=3)
        projected = b.one("Reshape", "x.flat", [joint, b.ints("x.flat.shape", [0, 0, _GATES * d * hidden])])
    else:
        projected = projections[0]
    xw = b.one("Add", "x.bias", [projected, b.const("bias", joint_bias)])
    h_prev = _joint_initial(b, inputs[5], "h0", d * hidden)
    c_prev = _joint_initial(b, inputs[6], "c0", d * hidden)
    recurrence = _Recurrence(b, weights, d, hidden)
    hs = []
    for k in range(steps):
        s = f"step{k}"
        gates = b.one("Gather", f"{s}/x", [xw, b.const(f"{s}/index", np.asarray(k, np.int64))], axis=0)
        if h_prev is not None:
            gates = b.one("Add", f"{s}/gates", [gates, recurrence.gates(s, h_prev)])
        i, o, f, c = b.split4(f"{s}/split", gates)
        i, o, f = (b.one("Sigmoid", f"{s}/{g}", [x]) for g, x in (("i", i), ("o", o), ("f", f)))
        cell = b.one("Mul", f"{s}/ic", [i, b.one("Tanh", f"{s}/c", [c])])
        if c_prev is not None:
            cell = b.one("Add", f"{s}/cell", [b.one("Mul", f"{s}/fc", [f, c_prev]), cell])
        h_prev = b.one("Mul", f"{s}/h", [o, b.one("Tanh", f"{s}/tanh", [cell])])
        c_prev = cell
        hs.append(h_prev)
    old, new = [], []
    y, y_h, y_c = (list(node.outputs) + [None, None, None])[:3]
    if _wanted(graph, y):
        old.append(y)
        new.append(_sequence_output(b, hs, back, hidden))
    for value, last, label in ((y_h, h_prev, "y_h"), (y_c, c_prev, "y_c")):
        if _wanted(graph, value):
            old.append(value)
            per_direction = b.one("Reshape", label, [last, b.ints(label + ".shape", [0, d, hidden])])
            new.append(b.one("Transpose", label + ".layout", [per_direction], perm=[1, 0, 2]))
    ir.convenience.replace_nodes_and_values(graph, node, [node], b.nodes, old, new)


class _Recurrence:
    """h V U, the recurrence's share of the gates (N, 4DH): one product through the joint factors,
    or, when they lie within directions (direction_factors), each direction's states through its
    own V_d and U_d, laid back in the joint order (gate, direction, unit)."""

    def __init__(self, b: _Builder, weights: Sequence[ir.Value], d: int, hidden: int) -> None:
        self.b = b
        self.v, self.u = weights
        split = direction_factors(constant_array(self.v), constant_array(self.u), d) if d > 1 else None
        self.parts = None
        if split is not None and all(v_d.shape[1] for v_d, _ in split):
            # each direction reads its own states through its own V_d (H x r_d) and U_d (r_d x 4H):
            # the joint V would be half zeros, read every step
            b.graph.initializers.pop(self.v.name)
            b.graph.initializers.pop(self.u.name)
            self.parts = [(b.ints(f"h{k}.starts", [k * hidden]), b.ints(f"h{k}.ends", [(k + 1) * hidden]),
                           b.const(f"v{k}", v_d), b.const(f"u{k}", u_d))
                          for k, (v_d, u_d) in enumerate(split)]
            self.axes = b.ints("h.axes", [1])
            self.gate_shape = b.ints("u.gates", [0, _GATES, 1, hidden])
            self.joint_shape = b.ints("u.joint", [0, _GATES * d * hidden])

    def gates(self, step: str, h: ir.Value) -> ir.Value:
        b = self.b
        if self.parts is None:
            return b.one("MatMul", f"{step}/out", [b.one("MatMul", f"{step}/in", [h, self.v]), self.u])
        per_direction = []
        for k, (start, end, v_d, u_d) in enumerate(self.parts):
            mine = b.one("Slice", f"{step}/h{k}", [h, start, end, self.axes])
            reduced = b.one("MatMul", f"{step}/in{k}", [mine, v_d])
            gates = b.one("MatMul", f"{step}/out{k}", [reduced, u_d])  # (N, 4H), gate-major
            per_direction.append(b.one("Reshape", f"{step}/g{k}", [gates, self.gate_shape]))
        joint = b.one("Concat", f"{step}/g", per_direction, axis=2)  # (N, 4, D, H)
        return b.one("Reshape", f"{step}/out", [joint, self.joint_shape])


def _wanted(graph: ir.Graph, value: ir.Value | None) -> bool:
    return value is not None and bool(value.name) and (bool(value.uses()) or value in graph.outputs)


def _joint_initial(b: _Builder, state: ir.Value | None, label: str, width: int) -> ir.Value | None:
    """An initial state (D, N, H) as the joint (N, DH); None (zeros) when the LSTM has none."""
    if state is None:
        return None
    batch_major = b.one("Transpose", label, [state], perm=[1, 0, 2])
    return b.one("Reshape", label + ".joint", [batch_major, b.ints(label + ".shape", [0, width])])


def _sequence_output(b: _Builder, hs: list[ir.Value], back: list[bool], hidden: int) -> ir.Value:
    """Y (T, D, N, H) from the steps' joint states, each reverse direction put back in time order."""
    d = len(back)
    rows = [b.one("Reshape", f"y{k}", [h, b.ints(f"y{k}.shape", [1, -1, d * hidden])]) for k, h in enumerate(hs)]
    stacked = b.one("Concat", "y.steps", rows, axis=0) if len(rows) > 1 else rows[0]
    split = b.one("Reshape", "y.directions", [stacked, b.ints("y.directions.shape", [0, 0, d, hidden])])
    if any(back):
        parts = []
        for j, reverse in enumerate(back):
            part = split if d == 1 else b.one("Slice", f"y.d{j}", [split, b.ints(f"y.d{j}.starts", [j]),
                                                                     b.ints(f"y.d{j}.ends", [j + 1]),
                                                                     b.ints(f"y.d{j}.axes", [2])])
            parts.append(b.reversed_in_time(f"y.d{j}.reversed", part) if reverse else part)
        split = b.one("Concat", "y.timed", parts, axis=2) if d > 1 else parts[0]
    return b.one("Transpose", "y", [split], perm=[0, 2, 1, 3])
