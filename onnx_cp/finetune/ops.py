"""Torch implementations of ONNX operators (default domain, opsets 7-21) for the interpreter.

Each handler is `fn(node, inputs, ctx) -> Tensor | tuple[Tensor, ...]` where `inputs` holds torch
tensors (None for an omitted optional input) and `node.attrs` python values. Where an operator
changed between opsets (an attribute that became an input), the handler checks what is present
instead of branching on the version. Shape values are int64 tensors computed from the runtime
tensors, so nothing about the batch size is ever baked in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from onnx_cp.errors import OnnxCpError

OPS: dict[str, Callable] = {}

# ONNX TensorProto data types -> torch dtypes (the ones CNN graphs use).
ONNX_TO_TORCH = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
    7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}


def op(*names: str):
    def register(fn: Callable) -> Callable:
        for name in names:
            OPS[name] = fn
        return fn
    return register


def _fail(node, why: str) -> OnnxCpError:
    return OnnxCpError(f"{node.op_type} node {node.name!r}: {why}")


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [float(v) for v in t.reshape(-1).tolist()]


def _axes(node, inputs: Sequence, index: int, attr: str = "axes") -> list[int] | None:
    """Axes given as an input (newer opsets) or as an attribute (older ones)."""
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    value = node.attrs.get(attr)
    return None if value is None else list(value)


# ---------------------------------------------------------------- convolution and pooling
def _spatial_pads(node, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] from `pads` or from auto_pad and the runtime shape."""
    nsp = len(kernel)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(node.attrs.get("pads", [0] * 2 * nsp))
    if auto_pad == "VALID":
        return [0] * 2 * nsp
    begins, ends = [], []
    for i in range(nsp):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _torch_pad_order(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, e1, e2] -> F.pad's (b_last, e_last, b_prev, e_prev, ...)."""
    n = len(pads) // 2
    order = []
    for i in reversed(range(n)):
        order += [pads[i], pads[n + i]]
    return order


def _symmetric(pads: Sequence[int]) -> bool:
    n = len(pads) // 2
    return list(pads[:n]) == list(pads[n:])


def _conv_fn(nsp: int, transpose: bool = False):
    table = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d),
             3: (F.conv3d, F.conv_transpose3d)}
    return table[nsp][1 if transpose else 0]


def _conv_operands(node, inputs, what: str):
    """Input, weight, bias, spatial rank, kernel, strides and dilations of a Conv/ConvTranspose."""
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nsp = w.dim() - 2
    if nsp not in (1, 2, 3):
        raise _fail(node, f"{nsp}-D {what} is not supported")
    kernel = list(node.attrs.get("kernel_shape", w.shape[2:]))
    strides = list(node.attrs.get("strides", [1] * nsp))
    dilations = list(node.attrs.get("dilations", [1] * nsp))
    return x, w, b, nsp, kernel, strides, dilations


@op("Conv")
def conv(node, inputs, ctx):
    x, w, b, nsp, kernel, strides, dilations = _conv_operands(node, inputs, "convolution")
    group = node.attrs.get("group", 1)
    pads = _spatial_pads(node, x, kernel, strides, dilations)
    if group == 1 and not any(pads) and list(x.shape[2:]) == list(w.shape[2:]):
        # The kernel covers the whole input (a classifier head such as charnet's conv3): a
        # matrix product, whose backward pass is many times faster than the convolution's.
        y = x.flatten(1) @ w.flatten(1).t()
        if b is not None:
            y = y + b
        return y.reshape(list(y.shape) + [1] * nsp)
    if _symmetric(pads):
        padding = pads[:nsp]
    else:  # torch convs only pad symmetrically: pad explicitly first
        x = F.pad(x, _torch_pad_order(pads))
        padding = [0] * nsp
    if nsp == 2 and group == 1 and w.shape[1] == 1:
        return _single_channel_conv2d(x, w, b, strides, padding, dilations)
    return _conv_fn(nsp)(x, w, b, strides, padding, dilations, group)


def _single_channel_conv2d(x, w, b, strides, padding, dilations):
    """A conv over a one-channel input (a grayscale network's first layer) as unfold + matrix
    product: same numbers, and a backward pass several times faster than torch's CPU conv."""
    n, _, h, wd = x.shape
    t, _, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), dilation=dilations, padding=padding, stride=strides)
    oh = (h + 2 * padding[0] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd + 2 * padding[1] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    y = (w.reshape(t, -1) @ cols).reshape(n, t, oh, ow)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


@op("ConvTranspose")
def conv_transpose(node, inputs, ctx):
    x, w, b, nsp, kernel, strides, dilations = _conv_operands(node, inputs, "transposed convolution")
    out_pad = list(node.attrs.get("output_padding", [0] * nsp))
    group = node.attrs.get("group", 1)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    full = [(x.shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + out_pad[i]
            for i in range(nsp)]
    out_shape = node.attrs.get("output_shape")
    if out_shape is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out_shape = [x.shape[2 + i] * strides[i] for i in range(nsp)]
    if out_shape is not None:
        out_shape = list(out_shape)[-nsp:]
        begins, ends = [], []
        for i in range(nsp):
            total = full[i] - out_shape[i]
            small, large = total // 2, total - total // 2
            upper = auto_pad == "SAME_UPPER"
            begins.append(small if upper else large)
            ends.append(large if upper else small)
        pads = begins + ends
    elif auto_pad == "VALID":
        pads = [0] * 2 * nsp
    else:
        pads = list(node.attrs.get("pads", [0] * 2 * nsp))
    # Full-size transposed conv, then crop the pads (negative pads grow the output);
    # the bias is added after cropping so grown borders get it too.
    y = _conv_fn(nsp, transpose=True)(x, w, None, strides, 0, 0, group, dilations)
    if any(out_pad):
        y = F.pad(y, _torch_pad_order([0] * nsp + out_pad))
    if any(pads):
        y = F.pad(y, _torch_pad_order([-p for p in pads]))
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * nsp)
    return y


def _pool_geometry(node, x):
    kernel = list(node.attrs["kernel_shape"])
    nsp = len(kernel)
    strides = list(node.attrs.get("strides", [1] * nsp))
    dilations = list(node.attrs.get("dilations", [1] * nsp))
    pads = _spatial_pads(node, x, kernel, strides, dilations)
    return kernel, strides, dilations, pads, nsp


@op("MaxPool")
def max_pool(node, inputs, ctx):
    x = inputs[0]
    if len(node.outputs) > 1 and node.outputs[1]:
        raise _fail(node, "the Indices output is not supported")
    kernel, strides, dilations, pads, nsp = _pool_geometry(node, x)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}.get(nsp)
    if fn is None:
        raise _fail(node, f"{nsp}-D pooling is not supported")
    ceil = bool(node.attrs.get("ceil_mode", 0))
    if _symmetric(pads) and all(p <= k // 2 for p, k in zip(pads, kernel)):
        return fn(x, kernel, strides, pads[:nsp], dilations, ceil_mode=ceil)
    x = F.pad(x, _torch_pad_order(pads), value=-math.inf)
    return fn(x, kernel, strides, 0, dilations, ceil_mode=ceil)


@op("AveragePool")
def average_pool(node, inputs, ctx):
    x = inputs[0]
    kernel, strides, dilations, pads, nsp = _pool_geometry(node, x)
    if any(d != 1 for d in dilations):
        raise _fail(node, "dilated average pooling is not supported")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}.get(nsp)
    if fn is None:
        raise _fail(node, f"{nsp}-D pooling is not supported")
    ceil = bool(node.attrs.get("ceil_mode", 0))
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    if not any(pads):
        return fn(x, kernel, strides, 0, ceil_mode=ceil)
    # General case: the mean is (sum of padded x) / (number of counted cells), both pooled the
    # same way, which handles asymmetric pads, count_include_pad and ceil-mode overhang alike.
    torch_pads = _torch_pad_order(pads)
    xp = F.pad(x, torch_pads)
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    mask = F.pad(ones, torch_pads, value=1.0 if include_pad else 0.0)
    num = fn(xp, kernel, strides, 0, ceil_mode=ceil)
    den = fn(mask, kernel, strides, 0, ceil_mode=ceil)
    return num / den


@op("GlobalAveragePool")
def global_average_pool(node, inputs, ctx):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(node, inputs, ctx):
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ---------------------------------------------------------------- normalization
@op("BatchNormalization")
def batch_norm(node, inputs, ctx):
    x, scale, bias, mean, var = inputs[:5]
    if any(out for out in node.outputs[1:]):
        raise _fail(node, "training-mode outputs (running mean/var) are not supported")
    eps = node.attrs.get("epsilon", 1e-5)
    update = ctx.training and ctx.update_bn_stats
    # ONNX momentum weighs the old statistic; torch's weighs the new one.
    momentum = 1.0 - node.attrs.get("momentum", 0.9)
    return F.batch_norm(x, mean, var, scale, bias, training=update, momentum=momentum, eps=eps)


@op("InstanceNormalization")
def instance_norm(node, inputs, ctx):
    x, scale, bias = inputs
    return F.instance_norm(x, weight=scale, bias=bias, eps=node.attrs.get("epsilon", 1e-5))


@op("LayerNormalization")
def layer_norm(node, inputs, ctx):
    if any(out for out in node.outputs[1:]):
        raise _fail(node, "Mean/InvStdDev outputs are not supported")
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = node.attrs.get("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + node.attrs.get("epsilon", 1e-5)) * scale
    return y if bias is None else y + bias


@op("LRN")
def lrn(node, inputs, ctx):
    x = inputs[0]
    size = node.attrs["size"]
    alpha, beta = node.attrs.get("alpha", 1e-4), node.attrs.get("beta", 0.75)
    bias = node.attrs.get("bias", 1.0)
    # ONNX sums channels [c - floor((size-1)/2), c + ceil((size-1)/2)] (torch centres differently
    # for even sizes): pad the channel axis that way and sum with a (size x 1 x ...) window.
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    squares = (x * x).unsqueeze(1)
    squares = F.pad(squares.flatten(3), (0, 0, front, back))
    window_sum = F.avg_pool2d(squares, (size, 1), stride=1) * size
    window_sum = window_sum.reshape(x.shape)
    return x / (bias + alpha / size * window_sum) ** beta


@op("Dropout")
def dropout(node, inputs, ctx):
    if len(node.outputs) > 1 and node.outputs[1]:
        raise _fail(node, "the mask output is not supported")
    ratio = node.attrs.get("ratio", 0.5)
    if len(inputs) > 1 and inputs[1] is not None:
        ratio = float(inputs[1])
    # Dropout follows the module's mode: active while fine-tuning, identity otherwise.
    return F.dropout(inputs[0], p=ratio, training=ctx.training)


# ---------------------------------------------------------------- activations
def _unary(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    OPS[name] = lambda node, inputs, ctx: fn(inputs[0])


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Sqrt": torch.sqrt,
    "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
    "Round": torch.round, "Erf": torch.erf, "Softplus": F.softplus, "Softsign": F.softsign,
    "Not": torch.logical_not, "Identity": lambda t: t, "Sin": torch.sin, "Cos": torch.cos,
    "Sign": torch.sign, "Mish": F.mish,
}.items():
    _unary(_name, _fn)


@op("LeakyRelu")
def leaky_relu(node, inputs, ctx):
    return F.leaky_relu(inputs[0], node.attrs.get("alpha", 0.01))


@op("Elu")
def elu(node, inputs, ctx):
    return F.elu(inputs[0], node.attrs.get("alpha", 1.0))


@op("Selu")
def selu(node, inputs, ctx):
    alpha = node.attrs.get("alpha", 1.67326319217681884765625)
    gamma = node.attrs.get("gamma", 1.05070102214813232421875)
    x = inputs[0]
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("Gelu")
def gelu(node, inputs, ctx):
    return F.gelu(inputs[0], approximate=node.attrs.get("approximate", "none"))


@op("PRelu")
def prelu(node, inputs, ctx):
    x, slope = inputs
    return torch.where(x < 0, x * slope, x)


@op("HardSigmoid")
def hard_sigmoid(node, inputs, ctx):
    alpha, beta = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
    return torch.clamp(alpha * inputs[0] + beta, 0.0, 1.0)


@op("HardSwish")
def hard_swish(node, inputs, ctx):
    return F.hardswish(inputs[0])


@op("Clip")
def clip(node, inputs, ctx):
    x = inputs[0]
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else node.attrs.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else node.attrs.get("max")
    if isinstance(low, torch.Tensor):
        low = low.item()
    if isinstance(high, torch.Tensor):
        high = high.item()
    return torch.clamp(x, low, high) if low is not None or high is not None else x


def _softmax_like(fn):
    def run(node, inputs, ctx):
        x = inputs[0]
        if ctx.opset < 13:  # old semantics: coerce to 2-D at `axis` (default 1)
            axis = node.attrs.get("axis", 1) % max(x.dim(), 1)
            flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
            return fn(flat, dim=1).reshape(x.shape)
        return fn(x, dim=node.attrs.get("axis", -1))
    return run


OPS["Softmax"] = _softmax_like(torch.softmax)
OPS["LogSoftmax"] = _softmax_like(torch.log_softmax)


# ---------------------------------------------------------------- arithmetic and logic
def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _div(a, b):
    if _is_int(a) and _is_int(b):
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(a, b):
    out = torch.pow(a, b)
    return out.to(a.dtype)  # ONNX Pow keeps the base's type


def _binary(fn):
    return lambda node, inputs, ctx: fn(inputs[0], inputs[1])


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": _pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    OPS[_name] = _binary(_fn)


@op("Mod")
def mod(node, inputs, ctx):
    a, b = inputs
    return torch.fmod(a, b) if node.attrs.get("fmod", 0) else torch.remainder(a, b)


def _variadic(fn):
    def run(node, inputs, ctx):
        out = inputs[0]
        for t in inputs[1:]:
            out = fn(out, t)
        return out
    return run


OPS["Sum"] = _variadic(torch.add)
OPS["Max"] = _variadic(torch.maximum)
OPS["Min"] = _variadic(torch.minimum)


@op("Mean")
def mean(node, inputs, ctx):
    return _variadic(torch.add)(node, inputs, ctx) / len(inputs)


@op("Where")
def where(node, inputs, ctx):
    return torch.where(inputs[0], inputs[1], inputs[2])


@op("Gemm")
def gemm(node, inputs, ctx):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if node.attrs.get("transA", 0):
        a = a.t()
    if node.attrs.get("transB", 0):
        b = b.t()
    y = a @ b
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@op("MatMul")
def matmul(node, inputs, ctx):
    return torch.matmul(inputs[0], inputs[1])


@op("Einsum")
def einsum(node, inputs, ctx):
    return torch.einsum(node.attrs["equation"], *inputs)


# ---------------------------------------------------------------- reductions
def _reduce(fn, axes_input_from: int):
    def run(node, inputs, ctx):
        x = inputs[0]
        axes = _axes(node, inputs, 1) if ctx.opset >= axes_input_from else node.attrs.get("axes")
        keep = bool(node.attrs.get("keepdims", 1))
        if not axes:
            if node.attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [a % x.dim() for a in axes], keep)
    return run


def _amax(x, dims, keep):
    return x.amax(dim=dims, keepdim=keep)


def _amin(x, dims, keep):
    return x.amin(dim=dims, keepdim=keep)


OPS["ReduceMean"] = _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k), 18)
OPS["ReduceSum"] = _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k), 13)
OPS["ReduceMax"] = _reduce(_amax, 18)
OPS["ReduceMin"] = _reduce(_amin, 18)
OPS["ReduceProd"] = _reduce(lambda x, d, k: _prod(x, d, k), 18)
OPS["ReduceL2"] = _reduce(lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k)), 18)
OPS["ReduceSumSquare"] = _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k), 18)


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


def _arg(fn):
    def run(node, inputs, ctx):
        x = inputs[0]
        axis = node.attrs.get("axis", 0)
        keep = bool(node.attrs.get("keepdims", 1))
        if node.attrs.get("select_last_index", 0):
            flipped = x.flip(axis)
            idx = fn(flipped, dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - idx
        return fn(x, dim=axis, keepdim=keep)
    return run


OPS["ArgMax"] = _arg(torch.argmax)
OPS["ArgMin"] = _arg(torch.argmin)


# ---------------------------------------------------------------- shapes and tensors
@op("Shape")
def shape(node, inputs, ctx):
    dims = list(inputs[0].shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    dims = dims[start:end] if end is not None else dims[start:]
    return torch.tensor(dims, dtype=torch.int64)


@op("Size")
def size(node, inputs, ctx):
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


@op("Flatten")
def flatten(node, inputs, ctx):
    x = inputs[0]
    axis = node.attrs.get("axis", 1)
    if axis < 0:
        axis += x.dim()
    return x.reshape(int(np.prod(x.shape[:axis])), -1) if axis > 0 else x.reshape(1, -1)


@op("Reshape")
def reshape(node, inputs, ctx):
    x = inputs[0]
    target = _ints(inputs[1]) if len(inputs) > 1 else list(node.attrs["shape"])
    if not node.attrs.get("allowzero", 0):  # 0 copies the input's dimension
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@op("Transpose")
def transpose(node, inputs, ctx):
    x = inputs[0]
    perm = node.attrs.get("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


@op("Squeeze")
def squeeze(node, inputs, ctx):
    x = inputs[0]
    axes = _axes(node, inputs, 1)
    if axes is None:
        return x.squeeze() if x.dim() else x
    out = x
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        out = out.squeeze(a)
    return out


@op("Unsqueeze")
def unsqueeze(node, inputs, ctx):
    x = inputs[0]
    axes = _axes(node, inputs, 1)
    rank = x.dim() + len(axes)
    out = x
    for a in sorted(a % rank for a in axes):
        out = out.unsqueeze(a)
    return out


@op("Concat")
def concat(node, inputs, ctx):
    tensors = [t for t in inputs if t is not None]
    return torch.cat(tensors, dim=node.attrs["axis"])


@op("Split")
def split(node, inputs, ctx):
    x = inputs[0]
    axis = node.attrs.get("axis", 0) % x.dim()
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else node.attrs.get("split")
    n = len(node.outputs)
    if not sizes:
        n = node.attrs.get("num_outputs", n)
        chunk = -(-x.shape[axis] // n)  # opset 18: the last chunk may be smaller
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    return tuple(torch.split(x, list(sizes), dim=axis))


@op("Slice")
def slice_(node, inputs, ctx):
    x = inputs[0]
    if len(inputs) > 1:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
    else:  # opset < 10
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes, steps = node.attrs.get("axes"), None
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        x = _slice_axis(x, axis % x.dim(), start, end, step)
    return x


def _slice_axis(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    dim = x.shape[axis]
    if step == 0:
        raise OnnxCpError("Slice with step 0")
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        index = [slice(None)] * axis + [slice(start, end, step)]
        return x[tuple(index)]
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    idx = torch.arange(start, end, step, device=x.device)
    return x.index_select(axis, idx)


def _axis_and_indices(node, x: torch.Tensor, idx: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The gather axis and the indices with negative ones counted from the end, as ONNX allows."""
    axis = node.attrs.get("axis", 0) % x.dim()
    idx = idx.long()
    return axis, torch.where(idx < 0, idx + x.shape[axis], idx)


@op("Gather")
def gather(node, inputs, ctx):
    x, idx = inputs
    axis, idx = _axis_and_indices(node, x, idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


@op("GatherElements")
def gather_elements(node, inputs, ctx):
    x, idx = inputs
    axis, idx = _axis_and_indices(node, x, idx)
    return torch.gather(x, axis, idx)


@op("Expand")
def expand(node, inputs, ctx):
    x, target = inputs[0], _ints(inputs[1])
    # ONNX Expand broadcasts both ways (a 1 in `target` keeps the input's dim).
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(target))
    return x.expand(shape)


@op("Tile")
def tile(node, inputs, ctx):
    return inputs[0].repeat(*_ints(inputs[1]))


@op("Range")
def range_(node, inputs, ctx):
    start, limit, delta = (t.item() for t in inputs)
    return torch.arange(start, limit, delta, dtype=inputs[0].dtype)


@op("ConstantOfShape")
def constant_of_shape(node, inputs, ctx):
    value = node.attrs.get("value")
    fill = torch.zeros(1, dtype=torch.float32) if value is None else torch.from_numpy(np.array(value))
    return torch.full(_ints(inputs[0]), fill.reshape(-1)[0].item(), dtype=fill.dtype)


@op("Cast")
def cast(node, inputs, ctx):
    dtype = ONNX_TO_TORCH.get(node.attrs["to"])
    if dtype is None:
        raise _fail(node, f"cast to ONNX type {node.attrs['to']} is not supported")
    return inputs[0].to(dtype)


@op("CastLike")
def cast_like(node, inputs, ctx):
    return inputs[0].to(inputs[1].dtype)


@op("Pad")
def pad(node, inputs, ctx):
    x = inputs[0]
    mode = node.attrs.get("mode", "constant")
    if len(inputs) > 1 and inputs[1] is not None:
        pads = _ints(inputs[1])
        value = inputs[2].item() if len(inputs) > 2 and inputs[2] is not None else 0.0
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    else:  # opset < 11
        pads, value, axes = list(node.attrs["pads"]), node.attrs.get("value", 0.0), None
    if axes is not None:  # opset 18: pads only for the listed axes
        full = [0] * 2 * x.dim()
        for i, a in enumerate(axes):
            full[a % x.dim()] = pads[i]
            full[x.dim() + a % x.dim()] = pads[len(axes) + i]
        pads = full
    order = _torch_pad_order(pads)
    while len(order) > 2 and order[-1] == 0 and order[-2] == 0:
        order = order[:-2]  # leading unpadded axes need not be named (reflect/replicate limits)
    if mode == "constant":
        return F.pad(x, order, value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise _fail(node, f"pad mode {mode!r} is not supported")
    if len(order) // 2 > x.dim() - 2 or len(order) > 6:
        raise _fail(node, f"{mode} padding of batch/channel axes is not supported")
    return F.pad(x, order, mode=torch_mode)


# ---------------------------------------------------------------- resampling
@op("Resize", "Upsample")
def resize(node, inputs, ctx):
    x = inputs[0]
    mode = node.attrs.get("mode", "nearest")
    if node.op_type == "Upsample" or ctx.opset < 11:
        # Upsample-7/9 and Resize-10: scales only, asymmetric coordinates, floor for nearest.
        scales = _floats(inputs[1]) if len(inputs) > 1 else list(node.attrs["scales"])
        coord, nearest_mode, sizes = "asymmetric", "floor", None
        mode = "linear" if mode == "bilinear" else mode
    else:
        scales = _floats(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
        sizes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        scales = scales or None
        coord = node.attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = node.attrs.get("nearest_mode", "round_prefer_floor")
    if node.attrs.get("antialias", 0):
        raise _fail(node, "antialiased resize is not supported")
    if node.attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise _fail(node, "keep_aspect_ratio_policy other than 'stretch' is not supported")
    if mode not in ("nearest", "linear"):
        raise _fail(node, f"resize mode {mode!r} is not supported")
    if coord == "tf_crop_and_resize":
        raise _fail(node, "coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
    axes = node.attrs.get("axes")
    axes = list(range(x.dim())) if axes is None else [a % x.dim() for a in axes]
    out = x
    for i, axis in enumerate(axes):
        size_in = x.shape[axis]
        if sizes is not None:
            size_out = sizes[i]
            scale = size_out / size_in
        else:
            scale = scales[i]
            size_out = math.floor(size_in * scale)
        if size_out == size_in and scale == 1.0:
            continue
        coords = _source_coords(coord, size_in, size_out, scale, x.device)
        if coords is None:
            raise _fail(node, f"coordinate_transformation_mode {coord!r} is not supported")
        if mode == "nearest":
            idx = _round_nearest(coords, nearest_mode).clamp(0, size_in - 1)
            out = out.index_select(axis, idx)
        else:
            coords = coords.clamp(0, size_in - 1)
            low = coords.floor().long()
            high = (low + 1).clamp(max=size_in - 1)
            shape = [1] * x.dim()
            shape[axis] = size_out
            frac = (coords - low).to(x.dtype).reshape(shape)
            out = out.index_select(axis, low) * (1 - frac) + out.index_select(axis, high) * frac
    return out


def _source_coords(mode: str, size_in: int, size_out: int, scale: float, device):
    # float32 like onnxruntime, so that nearest rounding ties fall the same way
    dst = torch.arange(size_out, dtype=torch.float32, device=device)
    scale = float(np.float32(scale))
    if mode == "half_pixel":
        return (dst + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (dst + 0.5) / scale - 0.5 if size_out > 1 else torch.zeros_like(dst)
    if mode == "align_corners":
        if size_out == 1:
            return torch.zeros_like(dst)
        return dst * float(size_in - 1) / float(size_out - 1)
    if mode == "asymmetric":
        return dst / scale
    if mode == "tf_half_pixel_for_nn":
        return (dst + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = size_out / (scale * size_in)
        center = size_in / 2
        offset = center * (1 - adjustment)
        return offset + (dst + 0.5) / scale - 0.5
    return None


def _round_nearest(coords: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "round_prefer_floor":
        return torch.ceil(coords - 0.5).long()
    if mode == "round_prefer_ceil":
        return torch.floor(coords + 0.5).long()
    if mode == "floor":
        return torch.floor(coords).long()
    if mode == "ceil":
        return torch.ceil(coords).long()
    raise OnnxCpError(f"Resize nearest_mode {mode!r} is not supported")


@op("DepthToSpace")
def depth_to_space(node, inputs, ctx):
    x = inputs[0]
    b = node.attrs["blocksize"]
    n, c, h, w = x.shape
    if node.attrs.get("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@op("SpaceToDepth")
def space_to_depth(node, inputs, ctx):
    x = inputs[0]
    b = node.attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


# ---------------------------------------------------------------- recurrent layers
# LSTM and GRU with the default activations, run step by step over the ONNX weight layout (gates
# i, o, f, c for LSTM and z, r, h for GRU), so W, R, B and P stay differentiable parameters.
_RNN_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}


def _rnn_setup(node, inputs, n_gates: int):
    """Check the attributes and bring every operand to the layout-0 form: X [seq, batch, input],
    initial states [num_directions, batch, hidden], lengths [batch] (None when all are full)."""
    attrs = node.attrs
    direction = attrs.get("direction", "forward")
    if isinstance(direction, bytes):
        direction = direction.decode()
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _fail(node, f"direction {direction!r} is not supported")
    num_dir = 2 if direction == "bidirectional" else 1
    activations = attrs.get("activations")
    if activations:
        names = [a.decode() if isinstance(a, bytes) else str(a) for a in activations]
        if [a.lower() for a in names] != _RNN_ACTIVATIONS[node.op_type] * num_dir:
            raise _fail(node, f"activations {names} are not supported (only the defaults)")
    for name in ("activation_alpha", "activation_beta"):
        if attrs.get(name):
            raise _fail(node, f"attribute {name} is not supported")
    if attrs.get("clip") is not None:
        raise _fail(node, "attribute clip is not supported")
    if attrs.get("input_forget", 0):
        raise _fail(node, "attribute input_forget=1 is not supported")
    layout = attrs.get("layout", 0)
    x, w, r = inputs[0], inputs[1], inputs[2]
    b = inputs[3] if len(inputs) > 3 else None
    lens = inputs[4] if len(inputs) > 4 else None
    states = [inputs[i] if len(inputs) > i else None for i in range(5, 7)]
    hidden = r.shape[-1]
    if attrs.get("hidden_size", hidden) != hidden:
        raise _fail(node, f"hidden_size {attrs['hidden_size']} does not match R's {hidden}")
    if w.shape[0] != num_dir or w.shape[1] != n_gates * hidden:
        raise _fail(node, f"W of shape {list(w.shape)} does not fit direction {direction!r} "
                          f"and hidden size {hidden}")
    if layout:
        x = x.transpose(0, 1)
        states = [None if s is None else s.transpose(0, 1) for s in states]
    seq, batch = x.shape[0], x.shape[1]
    if lens is not None and lens.numel():
        lens = lens.reshape(-1).to(device=x.device, dtype=torch.long)
        if bool((lens == seq).all()):
            lens = None
    else:
        lens = None
    zeros = x.new_zeros(num_dir, batch, hidden)
    states = [zeros if s is None else s for s in states]
    return direction, layout, x, w, r, b, lens, states, hidden


def _rnn_outputs(layout: int, ys: list[torch.Tensor], finals: list[list[torch.Tensor]]):
    """Per-direction Y [seq, batch, hidden] and final states -> ONNX Y, Y_h(, Y_c)."""
    y = torch.stack(ys, dim=1)  # [seq, num_directions, batch, hidden]
    out = [torch.stack(f, dim=0) for f in finals]  # [num_directions, batch, hidden]
    if layout:
        y = y.permute(2, 0, 1, 3)
        out = [t.transpose(0, 1) for t in out]
    return (y, *out)


def _rnn_run(step, x, lens, reverse: bool, states: list[torch.Tensor]):
    """Run `step(t, states) -> states` over time; the first state is the output H. With
    `lens`, a batch entry keeps its state (and outputs zeros) at steps past its length."""
    seq = x.shape[0]
    ys: list[torch.Tensor | None] = [None] * seq
    for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
        new = step(t, states)
        if lens is None:
            states, ys[t] = new, new[0]
        else:
            live = (t < lens).unsqueeze(1)
            states = [torch.where(live, n, s) for n, s in zip(new, states)]
            ys[t] = torch.where(live, new[0], torch.zeros_like(new[0]))
    return torch.stack(ys, dim=0), states


def _directions(direction: str) -> list[bool]:
    return {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]


@op("LSTM")
def lstm(node, inputs, ctx):
    direction, layout, x, w, r, b, lens, (h0, c0), hidden = _rnn_setup(node, inputs, 4)
    p = inputs[7] if len(inputs) > 7 else None
    ys, finals = [], [[], []]
    for d, reverse in enumerate(_directions(direction)):
        xw = torch.matmul(x, w[d].t())  # all steps at once: [seq, batch, 4 * hidden]
        if b is not None:
            xw = xw + b[d, :4 * hidden] + b[d, 4 * hidden:]
        peep = None if p is None else p[d].split(hidden)  # P_i, P_o, P_f
        rt = r[d].t()

        def step(t, state, xw=xw, rt=rt, peep=peep):
            h, c = state
            gates = xw[t] + h @ rt
            i, o, f, g = gates.split(hidden, dim=-1)
            if peep is not None:
                i, f = i + peep[0] * c, f + peep[2] * c
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if peep is not None:
                o = o + peep[1] * c_new
            return [torch.sigmoid(o) * torch.tanh(c_new), c_new]

        y, (h, c) = _rnn_run(step, x, lens, reverse, [h0[d], c0[d]])
        ys.append(y)
        finals[0].append(h)
        finals[1].append(c)
    return _rnn_outputs(layout, ys, finals)


@op("GRU")
def gru(node, inputs, ctx):
    direction, layout, x, w, r, b, lens, (h0, _), hidden = _rnn_setup(node, inputs[:6], 3)
    before_reset = bool(node.attrs.get("linear_before_reset", 0))
    ys, finals = [], [[]]
    for d, reverse in enumerate(_directions(direction)):
        xw = torch.matmul(x, w[d].t())  # [seq, batch, 3 * hidden]
        rb = None
        if b is not None:
            xw = xw + b[d, :3 * hidden]
            rb = b[d, 3 * hidden:]
        r_zr, r_h = r[d, :2 * hidden].t(), r[d, 2 * hidden:].t()

        def step(t, state, xw=xw, rb=rb, r_zr=r_zr, r_h=r_h):
            h = state[0]
            x_zr, x_h = xw[t, :, :2 * hidden], xw[t, :, 2 * hidden:]
            hr_zr = h @ r_zr
            if rb is not None:
                hr_zr = hr_zr + rb[:2 * hidden]
            z, rg = torch.sigmoid(x_zr + hr_zr).split(hidden, dim=-1)
            if before_reset:
                hr_h = h @ r_h
                if rb is not None:
                    hr_h = hr_h + rb[2 * hidden:]
                cand = torch.tanh(x_h + rg * hr_h)
            else:
                hr_h = (rg * h) @ r_h
                if rb is not None:
                    hr_h = hr_h + rb[2 * hidden:]
                cand = torch.tanh(x_h + hr_h)
            return [(1 - z) * cand + z * h]

        y, (h,) = _rnn_run(step, x, lens, reverse, [h0[d]])
        ys.append(y)
        finals[0].append(h)
    return _rnn_outputs(layout, ys, finals)


# ------------------------------------------------------------------ quantization (QDQ)
# Integer ranges by zero-point dtype (a missing zero point means uint8).
_INT_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _along(param: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-tensor (0-D) or per-axis (1-D) scale or zero point, shaped to broadcast against x."""
    if param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return param.reshape(shape)


@op("QuantizeLinear")
def quantize_linear(node, inputs, ctx):
    """Fake quantization: the integers as a float tensor, rounded (half to even, as ONNX) with a
    straight-through gradient and clamped to the zero point's range; DequantizeLinear reads them."""
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else torch.zeros((), dtype=torch.uint8)
    axis = node.attrs.get("axis", 1)
    low, high = _INT_RANGES[zero.dtype]
    q = x / _along(scale, x, axis) + _along(zero.to(x.dtype), x, axis)
    q = q + (torch.round(q) - q).detach()
    return torch.clamp(q, low, high)


@op("DequantizeLinear")
def dequantize_linear(node, inputs, ctx):
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    axis = node.attrs.get("axis", 1)
    x = x.to(scale.dtype)
    if zero is not None:
        x = x - _along(zero.to(scale.dtype), x, axis)
    return x * _along(scale, x, axis)


def supported_ops() -> list[str]:
    return sorted(OPS) + ["Constant"]


__all__ = ["ONNX_TO_TORCH", "OPS", "supported_ops"]
