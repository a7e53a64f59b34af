"""Fuzz the onnx-cp CLI with mutated Conv models and bad options, checking its promises.

    python benchmarks/fuzz.py --seed 1 --count 2000 [--minutes 10] [--case 17] [--keep DIR]

Every case is built from (seed, index) alone, so `--seed S --case I` replays one case. A case is a
small Conv model from tests/model_factory.py mutated at the protobuf level (nodes, initializers,
inputs, attributes, dims, dtypes, versions, external data, raw bytes) and/or a command line with bad
options; it runs in-process through onnx_cp.cli.main with stdout and stderr (Python and fd 2, where
onnxruntime's C++ logs go) captured, and these invariants are checked:

- the exit code is 0, 1, 2 or 3 (and no exception escapes main);
- on a non-zero exit, stderr is exactly one line "onnx-cp <command>: error: ...", which is not the
  "(rerun with --debug)" fallback and holds no "Traceback";
- the input files (IN, its external data, data sets) keep their bytes;
- on failure the folder holds exactly the files it held before (no OUT, OUT.data, ".onnx-cp-*" or
  "*.tmp" left behind, a pre-existing OUT unchanged);
- on success OUT loads, passes onnx.checker, and onnxruntime's outputs on random inputs match IN's:
  identical when nothing was decomposed, else within a tolerance derived from the report's
  rel_error.

A case that breaks one is printed with its reproduction command, and its folder is kept under --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from model_factory import conv_model, low_rank_kernel, tiny_cnn  # noqa: E402

# Defects found by the fuzzer and not fixed yet, matched on stderr: counted apart ("known defects")
# instead of failing the run. Remove an entry once it is fixed.
KNOWN_DEFECTS: dict[str, str] = {}
CASE_SECONDS = 120  # a case running longer is a hang (reported as a violation)
EXIT_CODES = {0, 1, 2, 3}


# --------------------------------------------------------------------------- seed models


def seed_models() -> list[onnx.ModelProto]:
    """Small Conv models: the tiny CNN, single Convs with/without bias, grouped, strided, as a
    Constant node, and a 3-D (1-D conv) one."""
    k = low_rank_kernel(8, 4, 3, 3, 2, seed=1)
    return [
        tiny_cnn(),
        tiny_cnn(seed=1, channels=8),
        conv_model(k, np.linspace(-1, 1, 8).astype(np.float32), pads=[1, 1, 1, 1]),
        conv_model(low_rank_kernel(8, 2, 3, 3, 2, seed=2), group=2, strides=[2, 2]),
        conv_model(k, weight_as="constant", auto_pad="SAME_UPPER"),
        conv_model(low_rank_kernel(6, 4, 5, 3, 3, seed=3), dilations=[2, 1]),
    ]


# --------------------------------------------------------------------------- model mutators
# Each takes (rng, proto) and mutates the proto in place; returns a short description.


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _conv_nodes(proto):
    return [n for n in proto.graph.node if n.op_type == "Conv"] or list(proto.graph.node)


def m_delete_node(rng, p):
    if not p.graph.node:
        return "no node to delete"
    i = int(rng.integers(len(p.graph.node)))
    del p.graph.node[i]
    return f"delete node {i}"


def m_duplicate_node(rng, p):
    node = _pick(rng, list(p.graph.node))
    copy = p.graph.node.add()
    copy.CopyFrom(node)
    if rng.random() < 0.5:
        copy.output[0] = copy.output[0] + "_dup"
    return f"duplicate node {node.name or node.op_type}"


def m_shuffle_nodes(rng, p):
    nodes = list(p.graph.node)
    order = rng.permutation(len(nodes))
    del p.graph.node[:]
    p.graph.node.extend(nodes[i] for i in order)
    return "shuffle node order"


def m_rewire_input(rng, p):
    node = _pick(rng, list(p.graph.node))
    if not node.input:
        return "no input to rewire"
    names = [v.name for v in p.graph.input] + [t.name for t in p.graph.initializer]
    names += [o for n in p.graph.node for o in n.output] + ["nothing", ""]
    j = int(rng.integers(len(node.input)))
    node.input[j] = _pick(rng, names)
    return f"rewire input {j} of {node.name or node.op_type} to {node.input[j]!r}"


def m_rename_output(rng, p):
    node = _pick(rng, list(p.graph.node))
    names = [o for n in p.graph.node for o in n.output] + [v.name for v in p.graph.input]
    names += [t.name for t in p.graph.initializer]
    node.output[0] = _pick(rng, names)
    return f"rename output of {node.name or node.op_type} to {node.output[0]!r}"


def m_delete_initializer(rng, p):
    if not p.graph.initializer:
        return "no initializer"
    i = int(rng.integers(len(p.graph.initializer)))
    name = p.graph.initializer[i].name
    del p.graph.initializer[i]
    return f"delete initializer {name}"


def m_duplicate_initializer(rng, p):
    if not p.graph.initializer:
        return "no initializer"
    t = _pick(rng, list(p.graph.initializer))
    array = numpy_helper.to_array(t)
    p.graph.initializer.append(numpy_helper.from_array((array * 2).astype(array.dtype), t.name))
    return f"duplicate initializer {t.name}"


def m_initializer_as_input(rng, p):
    if not p.graph.initializer:
        return "no initializer"
    t = _pick(rng, list(p.graph.initializer))
    p.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return f"initializer {t.name} also a graph input"


def m_graph_inputs(rng, p):
    choice = int(rng.integers(4))
    if choice == 0 and p.graph.input:
        del p.graph.input[0]
        return "delete graph input 0"
    if choice == 1:
        p.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, 3]))
        return "add unused graph input"
    if choice == 2 and p.graph.input:
        p.graph.input.append(p.graph.input[0])
        return "duplicate graph input"
    value = p.graph.input[0] if p.graph.input else None
    if value is None:
        return "no input"
    dims = _pick(rng, [[], [1], [0, 3, 16, 16], [-3, 3, 16, 16], [1, 3, 1, 1], [2**40, 3, 16, 16],
                       [1, 3, 16, 16, 16], [1, 7, 16, 16], [1, 3, 100000, 100000]])
    value.type.tensor_type.ClearField("shape")
    if dims or rng.random() < 0.5:
        value.type.tensor_type.shape.dim.extend([])
        for d in dims:
            value.type.tensor_type.shape.dim.add().dim_value = d
    if rng.random() < 0.2:
        value.type.tensor_type.elem_type = _pick(rng, [TensorProto.DOUBLE, TensorProto.INT64, TensorProto.STRING, 0])
    return f"graph input dims {dims}"


def m_graph_outputs(rng, p):
    choice = int(rng.integers(3))
    if choice == 0 and p.graph.output:
        del p.graph.output[0]
        return "delete graph output"
    if choice == 1:
        p.graph.output.append(helper.make_tensor_value_info("nowhere", TensorProto.FLOAT, None))
        return "add output produced by nothing"
    node = _pick(rng, list(p.graph.node))
    p.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    return f"expose {node.output[0]} as an output"


BAD_ATTRIBUTES = [
    ("pads", 1.5), ("pads", "same"), ("pads", [1, 1]), ("pads", [-1, -1, -1, -1]), ("pads", [10**6] * 4),
    ("kernel_shape", [3]), ("kernel_shape", [3, 3, 3]), ("kernel_shape", [5, 5]), ("kernel_shape", 3.0),
    ("group", 3), ("group", 0), ("group", -2), ("group", 2.5), ("group", "two"),
    ("strides", [0, 0]), ("strides", [-1, 1]), ("strides", [1]), ("strides", [10**9, 10**9]),
    ("dilations", [0, 1]), ("dilations", [100, 100]), ("auto_pad", "MAYBE"), ("auto_pad", 1),
    ("auto_pad", "VALID"), ("unknown_attr", 7),
]


def m_attribute(rng, p):
    node = _pick(rng, _conv_nodes(p))
    name, value = _pick(rng, BAD_ATTRIBUTES)
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    if rng.random() < 0.9:
        node.attribute.append(helper.make_attribute(name, value))
    else:
        return f"delete attribute {name} of {node.name}"
    return f"attribute {name}={value!r} on {node.name or node.op_type}"


def m_attribute_type(rng, p):
    node = _pick(rng, _conv_nodes(p))
    if not node.attribute:
        return "no attribute"
    attr = _pick(rng, list(node.attribute))
    attr.type = _pick(rng, [TensorProto.FLOAT, onnx.AttributeProto.STRING, onnx.AttributeProto.INT,
                            onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPH, 99])
    return f"attribute {attr.name} of {node.name} retyped to {attr.type}"


def m_dims(rng, p):
    if not p.graph.initializer:
        return "no initializer"
    t = _pick(rng, list(p.graph.initializer))
    choice = int(rng.integers(5))
    if choice == 0:
        t.dims[0] = _pick(rng, [0, 10**12, 2**31, 7])
    elif choice == 1:
        t.dims.append(1)
    elif choice == 2 and t.dims:
        del t.dims[-1]
    elif choice == 3:
        t.dims[0] = -int(t.dims[0] or 1)
    else:
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    return f"dims/data of {t.name}: {list(t.dims)}, {len(t.raw_data)} bytes"


def m_nonfinite(rng, p):
    if not p.graph.initializer:
        return "no initializer"
    t = _pick(rng, list(p.graph.initializer))
    array = numpy_helper.to_array(t).copy()
    if not np.issubdtype(array.dtype, np.floating) or not array.size:
        return "no float initializer"
    flat = array.reshape(-1)
    flat[int(rng.integers(flat.size))] = _pick(rng, [np.nan, np.inf, -np.inf])
    if rng.random() < 0.2:
        flat[:] = np.nan
    t.CopyFrom(numpy_helper.from_array(array, t.name))
    return f"NaN/Inf in {t.name}"


def m_dtype(rng, p):
    if not p.graph.initializer:
        return "no initializer"
    t = _pick(rng, list(p.graph.initializer))
    array = numpy_helper.to_array(t)
    dtype = _pick(rng, [np.float16, np.float64, np.int8, np.int64])
    t.CopyFrom(numpy_helper.from_array(array.astype(dtype), t.name))
    if rng.random() < 0.3:
        t.data_type = _pick(rng, [0, 99, TensorProto.STRING, TensorProto.BFLOAT16])
    return f"{t.name} as {dtype.__name__} / type {t.data_type}"


def m_op_type(rng, p):
    node = _pick(rng, list(p.graph.node))
    choice = int(rng.integers(3))
    if choice == 0:
        node.op_type = _pick(rng, ["ConvTranspose", "NoSuchOp", "Relu", "Conv", "conv", ""])
    elif choice == 1:
        node.domain = _pick(rng, ["com.microsoft", "ai.onnx", "no.such.domain"])
    else:
        node.name = _pick(rng, [p.graph.node[0].name, "", "x" * 500, "conv1"])
    return f"node {node.name[:20]!r} op {node.op_type!r} domain {node.domain!r}"


def m_versions(rng, p):
    if rng.random() < 0.5:
        p.ir_version = _pick(rng, [0, 1, 2, 3, 4, 7, 9, 11, 12, 13, 14, 15, 99])
        return f"ir_version {p.ir_version}"
    choice = int(rng.integers(3))
    if choice == 0:
        p.opset_import[0].version = _pick(rng, [0, 1, 6, 7, 11, 13, 21, 22, 28, 29, 1000])
    elif choice == 1:
        del p.opset_import[:]
    else:
        p.opset_import.append(helper.make_opsetid(_pick(rng, ["", "com.microsoft"]), 1))
    return f"opsets {[(o.domain, o.version) for o in p.opset_import]}"


def m_subgraph(rng, p):
    """Wrap the last node in an If whose both branches hold it (a Conv inside a subgraph)."""
    node = p.graph.node[-1]
    out = node.output[0]
    branch = helper.make_graph([node], "branch", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "cond")
    p.graph.initializer.append(cond)
    wrapper = helper.make_node("If", ["cond"], [out], then_branch=branch, else_branch=branch)
    del p.graph.node[-1]
    p.graph.node.append(wrapper)
    return "last node inside an If"


MODEL_MUTATORS = [
    m_delete_node, m_duplicate_node, m_shuffle_nodes, m_rewire_input, m_rename_output,
    m_delete_initializer, m_duplicate_initializer, m_initializer_as_input, m_graph_inputs,
    m_graph_outputs, m_attribute, m_attribute, m_attribute_type, m_dims, m_nonfinite, m_nonfinite,
    m_dtype, m_op_type, m_versions, m_versions, m_subgraph,
]


# --------------------------------------------------------------------------- writing IN


def write_model(rng, proto: onnx.ModelProto, folder: Path, notes: list[str]) -> Path:
    """Serialize the model as IN, sometimes with external data or damaged bytes."""
    path = folder / "in.onnx"
    how = rng.random()
    if how < 0.15:
        _write_external(rng, proto, path, notes)
        return path
    data = proto.SerializeToString()
    if how < 0.27:
        choice = int(rng.integers(5))
        if choice == 0:
            data = data[: int(rng.integers(len(data)))]
            notes.append("truncated bytes")
        elif choice == 1:
            buf = bytearray(data)
            for _ in range(int(rng.integers(1, 20))):
                buf[int(rng.integers(len(buf)))] = int(rng.integers(256))
            data = bytes(buf)
            notes.append("corrupted bytes")
        elif choice == 2:
            data = b""
            notes.append("empty file")
        elif choice == 3:
            data = rng.bytes(int(rng.integers(1, 4000)))
            notes.append("random bytes")
        else:
            data = data + rng.bytes(int(rng.integers(1, 100)))
            notes.append("trailing garbage")
    path.write_bytes(data)
    return path


def _write_external(rng, proto, path: Path, notes: list[str]) -> None:
    onnx.save(proto, str(path), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    data = path.parent / "in.onnx.data"
    if not data.exists():
        notes.append("external data (no tensor to store)")
        return
    choice = int(rng.integers(9))
    if choice == 0:
        notes.append("external data")
        return
    if choice == 1:
        data.unlink()
        notes.append("external data file missing")
        return
    if choice == 2:
        with open(data, "r+b") as f:
            f.truncate(int(rng.integers(max(1, data.stat().st_size))))
        notes.append("external data file truncated")
        return
    if choice == 3:
        data.write_bytes(b"")
        notes.append("external data file empty")
        return
    stored = onnx.load(str(path), load_external_data=False)
    tensors = [t for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if not tensors:
        notes.append("external data (no external tensor)")
        return
    tensor = _pick(rng, tensors)
    key, value = _pick(rng, [
        ("offset", str(10**9)), ("offset", "-8"), ("offset", "abc"), ("length", str(10**9)), ("length", "-1"),
        ("length", "0"), ("location", "../outside.data"), ("location", "/etc/hostname"), ("location", "nope.data"),
        ("location", "."), ("location", ""), ("checksum", "x"),
    ])
    entries = {e.key: e for e in tensor.external_data}
    if key in entries:
        entries[key].value = value
    else:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    notes.append(f"external data of {tensor.name}: {key}={value!r}")
    path.write_bytes(stored.SerializeToString())


# --------------------------------------------------------------------------- options

BAD_NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e308", "99999999999999999999", "abc", "", "1e-320"]
BASE_OPTIONS = ["-q", "--workers", "1"]


def good_policy(rng) -> list[str]:
    return _pick(rng, [["--rank", "2"], ["--rank", "4"], ["--max-error", "0.3"], ["--rank", "conv2=3"],
                       ["--rank", "3", "--layers", "conv"], ["--rank", "2", "--exclude", "conv1"]])


def bad_option(rng, folder: Path, in_path: Path) -> tuple[list[str], str]:
    """One bad option (returned with a description); may create files in the folder."""
    nan_npz = folder / "nan.npz"
    choice = int(rng.integers(16))
    if choice == 0:
        return ["--rank", _pick(rng, BAD_NUMBERS + ["conv1=0", "nosuch=4", "conv1=nan", "=3", "conv1="])], "rank"
    if choice == 1:
        return ["--max-error", _pick(rng, BAD_NUMBERS)], "max-error"
    if choice == 2:
        return ["--target-speedup", _pick(rng, ["nan", "inf", "-1", "0", "abc", "-inf"])], "target-speedup"
    if choice == 3:
        regex = _pick(rng, ["([", "*", "(?P<", "\\", "a{2,1}"])
        return ["--rank", "2", _pick(rng, ["--layers", "--exclude"]), regex], "regex"
    if choice == 4:
        shape = _pick(rng, ["x:0,3,16,16", "x:-1,3,16,16", "x:1,3,nan,16", "nosuch:1,2", "x:", "x", ":1",
                            "x:1,3,16", "x:1,3,16,16,16", "x:99999999999999999999,3,16,16"])
        return ["--rank", "2", "--input-shape", shape], "input-shape"
    if choice == 5:
        return ["--rank", "2", "--threads", _pick(rng, ["-1", "100000", "nan", "abc", "1.5"])], "threads"
    if choice == 6:
        return ["--rank", "2", "--seed", _pick(rng, ["-1", "nan", "1e99", "abc", str(2**70)])], "seed"
    if choice == 7:
        return ["--rank", "2", "--workers", _pick(rng, ["0", "-1", "100000", "abc"])], "workers"
    if choice == 8:
        config = folder / "cfg.toml"
        text = _pick(rng, ["[tool.onnx-cp]\nrank = 'nan'\n", "not toml ][", "[tool.onnx-cp]\nnosuch = 1\n",
                           "[tool.onnx-cp]\nmax_error = -1\n", "\xff\xfe"])
        config.write_text(text, errors="replace")
        target = _pick(rng, [str(config), str(folder / "missing.toml"), str(folder)])
        return ["--config", target], "config"
    if choice == 9:
        _write_npz(nan_npz, rng, nan=True)
        flag = _pick(rng, ["--eval-data", "--error-data", "--calibration-data"])
        extra = ["--quantize", "int8"] if flag == "--calibration-data" else []
        return ["--max-error", "0.3", flag, str(_pick(rng, [nan_npz, folder / "missing.npz", in_path, folder])),
                *extra], "data"
    if choice == 10:
        _write_npz(folder / "ok.npz", rng, nan=False)
        option = _pick(rng, [["--scale", _pick(rng, BAD_NUMBERS)], ["--mean", _pick(rng, ["nan", "inf", "1,2", "abc"])],
                             ["--std", _pick(rng, ["0", "nan", "-inf", "1,2,3,4"])], ["--size", "0,0"]])
        return ["--rank", "2", "--eval-data", str(folder / "ok.npz"), *option], "preprocessing"
    if choice == 11:
        return ["--max-output-error", _pick(rng, BAD_NUMBERS + ["0.1"])], "max-output-error"
    if choice == 12:
        return ["--rank", "2", "--external-data", _pick(rng, ["maybe", "yes", "no", ""])], "external-data"
    if choice == 13:
        return ["--rank", "2", "--method", _pick(rng, ["nls", "als", "svd", ""])], "method"
    if choice == 14:
        return ["--rank", "2", "--epochs", _pick(rng, ["1", "0", "-1", "nan"])], "epochs without data"
    return ["--rank", "2", "--report", _pick(rng, [str(in_path), str(folder), str(folder / "no" / "r.json")])], "report"


def _write_npz(path: Path, rng, *, nan: bool) -> None:
    x = rng.standard_normal((6, 3, 16, 16)).astype(np.float32)
    if nan:
        x[int(rng.integers(6)), 0, 0, 0] = _pick(rng, [np.nan, np.inf])
    np.savez(path, x=x, y=np.arange(6) % 3)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    seed: int
    index: int
    folder: Path
    argv: list[str]
    in_path: Path | None
    out_path: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        return self.argv[0]

    def describe(self) -> str:
        return "; ".join(self.notes)


def build_case(seed: int, index: int, root: Path) -> Case:
    rng = np.random.default_rng([seed, index])
    folder = root / f"case-{index}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    seeds = seed_models()
    proto = onnx.ModelProto()
    proto.CopyFrom(_pick(rng, seeds))
    notes: list[str] = []
    kind = rng.random()
    mutate_model = kind < 0.75
    if mutate_model:
        for _ in range(1 + int(rng.random() < 0.3)):
            mutator = _pick(rng, MODEL_MUTATORS)
            try:
                notes.append(mutator(rng, proto))
            except Exception as exc:  # noqa: BLE001 - a mutation that does not apply to this model
                notes.append(f"{mutator.__name__} not applicable ({type(exc).__name__})")
    in_path = write_model(rng, proto, folder, notes) if kind < 0.97 else None
    out_path = folder / "out.onnx"
    report = folder / "report.json"
    command = "optimize"
    if in_path is None:  # IN / OUT themselves are bad
        choice = int(rng.integers(6))
        in_path = folder / "in.onnx"
        onnx.save(proto, str(in_path))
        argv_in, argv_out = str(in_path), str(out_path)
        if choice == 0:
            argv_in = str(folder / "missing.onnx")
        elif choice == 1:
            argv_in = str(folder)
        elif choice == 2:
            argv_out = str(in_path)
        elif choice == 3:
            (folder / "dir.onnx").mkdir()
            argv_out = str(folder / "dir.onnx")
        elif choice == 4:
            argv_out = str(folder / "no" / "such" / "out.onnx")
        else:
            argv_in = "/dev/null"
        notes.append(f"IN {argv_in} OUT {argv_out}")
        return Case(seed, index, folder, ["optimize", argv_in, argv_out, *BASE_OPTIONS, "--rank", "2",
                                          "--report", str(report)], in_path, out_path, notes)
    if not mutate_model or rng.random() < 0.25:
        options, what = bad_option(rng, folder, in_path)
        notes.append(f"bad option {what}: {options}")
    else:
        options = good_policy(rng)
    if rng.random() < 0.1:
        command = _pick(rng, ["bench", "eval"])
    if command == "bench":
        argv = ["bench", str(in_path), "-q", "--runs", "2", "--warmup", "0",
                *_pick(rng, [[], ["--batch", _pick(rng, ["0", "-1", "nan", "2"])], ["--runs", "0"]])]
        out_path = None
    elif command == "eval":
        data = folder / "eval.npz"
        _write_npz(data, rng, nan=rng.random() < 0.3)
        argv = ["eval", str(in_path), "--data", str(data), "-q"]
        out_path = None
    else:
        argv = ["optimize", str(in_path), str(out_path), *BASE_OPTIONS, *options]
        if "--report" not in options:
            argv += ["--report", str(report)]
    return Case(seed, index, folder, argv, in_path, out_path, notes)


# --------------------------------------------------------------------------- running and checking


class CaseTimeout(BaseException):
    """Raised by the alarm: a BaseException, so that main's `except Exception` cannot swallow it."""


@contextlib.contextmanager
def captured_output():
    """Capture sys.stdout, sys.stderr and file descriptor 2 (onnxruntime's C++ logger)."""
    out, err = io.StringIO(), io.StringIO()
    fd_file = tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd_file.fileno(), 2)
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    result = {}
    try:
        yield result
    finally:
        sys.stdout, sys.stderr = old
        os.dup2(saved, 2)
        os.close(saved)
        fd_file.seek(0)
        result["stderr"] = err.getvalue() + fd_file.read().decode(errors="replace")
        result["stdout"] = out.getvalue()
        fd_file.close()


def snapshot(folder: Path) -> dict[str, str]:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            files[str(path.relative_to(folder)) + "/"] = "dir"
    return files


@dataclass
class Outcome:
    code: int | None
    stderr: str
    violations: list[str]
    seconds: float
    decomposed: int | None = None


def run_case(case: Case) -> Outcome:
    from onnx_cp.cli import main

    before = snapshot(case.folder)
    extra_inputs = {"/dev/null"}
    started = time.perf_counter()
    violations: list[str] = []
    code = None
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        with captured_output() as output:
            try:
                code = main(list(case.argv))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except CaseTimeout:
                violations.append(f"hang: more than {CASE_SECONDS} s")
            except BaseException as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
                violations.append(f"exception escaped main: {type(exc).__name__}: {exc}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - started
    stderr = output["stderr"]
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code is not None and code not in EXIT_CODES:
        violations.append(f"exit code {code}")
    if code not in (None, 0):
        prefix = f"onnx-cp {case.command}: error: "
        if len(lines) != 1:
            violations.append(f"{len(lines)} stderr lines")
        if not lines or not lines[-1].startswith(prefix):
            violations.append("stderr does not start with " + repr(prefix))
        if "(rerun with --debug)" in stderr:
            violations.append("fallback line (an unexpected exception)")
    if "Traceback" in stderr:
        violations.append("traceback on stderr")
    after = snapshot(case.folder)
    outputs = {"out.onnx", "out.onnx.data", "report.json"} if case.command == "optimize" else set()
    for name, digest in before.items():
        if name in outputs:
            continue
        if after.get(name) != digest:
            violations.append(f"input {name} {'modified' if name in after else 'deleted'}")
    new = sorted(set(after) - set(before))
    if code != 0:
        if new or any(after.get(n) != d for n, d in before.items()):
            violations.append(f"failed run left or changed files: {new or 'changed existing'}")
    else:
        leftovers = [n for n in new if n not in outputs]
        if leftovers:
            violations.append(f"unexpected files after success: {leftovers}")
    decomposed = None
    if code == 0 and case.command == "optimize" and not violations:
        decomposed = check_written(case, violations)
    del extra_inputs
    return Outcome(code, stderr, violations, seconds, decomposed)


def _alarm(signum, frame):
    raise CaseTimeout()


def _option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


def check_written(case: Case, violations: list[str]) -> int | None:
    """OUT loads, passes onnx.checker and computes IN's function within the reported error."""
    import onnxruntime as ort

    out = Path(case.argv[2])
    report_path = _option(case.argv, "--report")
    if not out.is_file():
        violations.append("success without OUT")
        return None
    try:
        onnx.checker.check_model(str(out))
    except Exception as exc:  # noqa: BLE001
        violations.append(f"OUT fails onnx.checker: {str(exc).splitlines()[0][:200]}")
        return None
    try:
        report = json.loads(Path(report_path).read_text()) if report_path else {}
    except (OSError, ValueError) as exc:
        violations.append(f"report unreadable: {exc}")
        return None
    decomposed = int(report.get("totals", {}).get("decomposed", 0) or 0)
    shapes = report.get("verification", {}).get("input_shapes") or report.get("input_shapes") or {}
    reported = float(report.get("verification", {}).get("max_rel_error", 0.0) or 0.0)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        # IN as bytes with its data loaded: given the path, onnxruntime 1.32 resolves an external
        # initializer that constant folding reads (an If's condition) against the working directory.
        source = onnx.load(str(case.in_path)).SerializeToString()
        original = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        written = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        violations.append(f"onnxruntime cannot load IN or OUT: {str(exc).splitlines()[0][:200]}")
        return decomposed
    # The verification's own random inputs (same shapes, seed 0), so that the reported error is the
    # bound: an independent draw can differ by several times on a 1x1 input (seed 7, case 11474).
    from onnx_cp.runtime.inputs import random_inputs
    from onnx_cp.runtime.model_io import load_model

    seed = int(_option(case.argv, "--seed") or 0)
    feeds = random_inputs(load_model(case.in_path), shapes, seed=seed)
    try:
        expected = original.run(None, feeds)
        actual = written.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in written.get_inputs()}})
    except Exception as exc:  # noqa: BLE001
        violations.append(f"onnxruntime cannot run IN or OUT: {str(exc).splitlines()[0][:200]}")
        return decomposed
    for a, b in zip(expected, actual):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            violations.append(f"output shape {a.shape} -> {b.shape}")
            continue
        mask = np.isfinite(a)
        if not np.all(np.isfinite(b[mask])):
            violations.append("OUT produces NaN/Inf where IN does not")
            continue
        a, b = np.where(mask, a, 0), np.where(mask, b, 0)
        scale = np.linalg.norm(a)
        rel = np.linalg.norm(a - b) / scale if scale > 0 else np.linalg.norm(b)
        # The report's inputs: its error plus float32 noise (graph optimisations may reorder sums).
        tolerance = 1e-5 if decomposed == 0 else 1.01 * reported + 1e-5
        if rel > tolerance:
            violations.append(f"OUT differs from IN: rel error {rel:.3g} > {tolerance:.3g} "
                              f"(reported {reported:.3g}, {decomposed} decomposed)")
    return decomposed


# --------------------------------------------------------------------------- driver


def fuzz(seed: int, count: int, root: Path, *, minutes: float | None = None, keep: Path | None = None,
         only: int | None = None, log=print) -> dict:
    """Run `count` cases (or until `minutes` have passed); return the counts and the failures."""
    from onnx_cp.cli import quiet_third_party

    quiet_third_party()  # what main does without --debug, once, before any capture
    counts: Counter = Counter()
    failures = []
    started = time.monotonic()
    indices = [only] if only is not None else range(count)
    for index in indices:
        if minutes is not None and time.monotonic() - started > minutes * 60:
            break
        case = build_case(seed, index, root)
        outcome = run_case(case)
        counts["cases"] += 1
        counts[f"exit {outcome.code}"] += 1
        if outcome.code == 0 and case.command == "optimize":
            counts["valid writes"] += 1
            if outcome.decomposed:
                counts["writes with decomposed layers"] += 1
        if ("(rerun with --debug)" in outcome.stderr or "Traceback" in outcome.stderr) and not any(
                text in outcome.stderr for text in KNOWN_DEFECTS):
            counts["tracebacks/fallback lines"] += 1
        if any("left or changed" in v for v in outcome.violations):
            counts["partial outputs"] += 1
        if any(v.startswith("input ") for v in outcome.violations):
            counts["inputs modified"] += 1
        known = [why for text, why in KNOWN_DEFECTS.items() if text in outcome.stderr]
        if outcome.violations and known:
            counts["known defects"] += 1
            log(f"[{index}] known defect ({known[0]}): {outcome.stderr.strip()[-200:]}")
        elif outcome.violations:
            counts["violations"] += 1
            repro = f"python benchmarks/fuzz.py --seed {seed} --case {index}"
            failures.append({"index": index, "case": case.describe(), "argv": case.argv,
                             "violations": outcome.violations, "stderr": outcome.stderr[-2000:], "repro": repro})
            log(f"[{index}] {case.describe()} | {' '.join(case.argv)}\n    -> {outcome.violations}\n"
                f"    stderr: {outcome.stderr.strip()[-600:]}\n    repro: {repro}")
            if keep is not None:
                shutil.copytree(case.folder, keep / f"seed{seed}-case{index}", dirs_exist_ok=True)
        elif only is not None:
            log(f"[{index}] {case.describe()} | {' '.join(case.argv)}\n    -> exit {outcome.code}: "
                f"{outcome.stderr.strip()[-600:]}")
        if _live_children():
            counts["orphans"] += 1  # a worker outliving its run (the solver pool is shut down per run)
        shutil.rmtree(case.folder, ignore_errors=True)
    counts["seconds"] = round(time.monotonic() - started, 1)
    return {"seed": seed, "counts": dict(counts), "failures": failures}


def _live_children() -> list[int]:
    """Child processes of this one still running, multiprocessing's resource tracker aside (Linux)."""
    me, alive = str(os.getpid()), []
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            cmdline = (status.parent / "cmdline").read_bytes()
            if fields.get("PPid", "").strip() == me and fields.get("State", "")[:1] != "Z" \
                    and b"resource_tracker" not in cmdline:
                alive.append(int(status.parent.name))
    return alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--minutes", type=float, help="stop after this long")
    parser.add_argument("--case", type=int, help="replay only this case index")
    parser.add_argument("--keep", type=Path, help="copy the folders of failing cases here")
    parser.add_argument("--json", type=Path, help="write counts and failures as JSON")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnx-cp-fuzz-") as root:
        result = fuzz(args.seed, args.count, Path(root), minutes=args.minutes, keep=args.keep, only=args.case)
    print(json.dumps(result["counts"], indent=1, sort_keys=True))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
