"""A small ONNX interpreter in torch: a run of graph nodes becomes an `nn.Module`.

Only the ops our ViT/DeiT/Swin exports use (float graphs, before QDQ). Chosen over a general
converter (onnx2torch) because we need hooks on chosen node inputs (the fake-quantizers) and
chosen initializers as parameters, and ~30 ops cover our exports.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

_NP_OF_ONNX = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
               onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
               onnx.TensorProto.DOUBLE: torch.float64}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _slice(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    idx = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise NotImplementedError("Slice with a non-positive step")
        n = x.shape[a]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        idx[a] = slice(s, e, st)
    return x[tuple(idx)]


def _reshape(x, shape, allowzero=0):
    shape = _ints(shape)
    if not allowzero:
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _gather(x, i, axis=0):
    axis = axis % x.dim()
    i = torch.where(i < 0, i + x.shape[axis], i)
    if i.dim() == 0:
        return x.select(axis, int(i))
    return x.index_select(axis, i.reshape(-1)).reshape(x.shape[:axis] + i.shape + x.shape[axis + 1:])


def _conv(x, w, b=None, strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET", **_):
    nd = w.dim() - 2
    if auto_pad not in ("NOTSET", b"NOTSET"):
        raise NotImplementedError("Conv auto_pad")
    pads = pads or [0] * (2 * nd)
    if pads[:nd] != pads[nd:]:
        raise NotImplementedError("asymmetric Conv pads")
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w, b, stride=strides or 1, padding=pads[:nd], dilation=dilations or 1, groups=group)


def _gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.t() if transA else a
    b = b.t() if transB else b
    y = alpha * (a @ b) if alpha != 1.0 else a @ b
    if c is not None:
        y = y + (beta * c if beta != 1.0 else c)
    return y


def _layer_norm(x, g, b=None, axis=-1, epsilon=1e-5, **_):
    axis = axis % x.dim()
    return F.layer_norm(x, x.shape[axis:], g, b, epsilon)


def _pad(x, pads, value=None, axes=None, mode="constant"):
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant" or axes is not None:
        raise NotImplementedError("Pad other than constant over all axes")
    p = _ints(pads)
    n = x.dim()
    tp = []
    for a in reversed(range(n)):  # torch: last axis first, (begin, end) pairs
        tp += [p[a], p[a + n]]
    return F.pad(x, tp, value=float(value) if value is not None else 0.0)


def _expand(x, shape):
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


def _reduce(fn):
    def run(x, axes=None, keepdims=1, noop_with_empty_axes=0):
        if axes is None or (torch.is_tensor(axes) and axes.numel() == 0):
            return x if noop_with_empty_axes else fn(x, dim=tuple(range(x.dim())), keepdim=bool(keepdims))
        ax = _ints(axes) if torch.is_tensor(axes) else list(axes)
        return fn(x, dim=tuple(ax), keepdim=bool(keepdims))
    return run


def _cast(x, to):
    return x.to(_NP_OF_ONNX[to])


# Tensors made here follow their input's device: one made on the CPU meets the segment's CUDA
# constants in the next Concat/Add and fails there (--device cuda)

def _range(start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


def _const_of_shape(shape, value=None):
    v = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return torch.full(tuple(_ints(shape)), v.reshape(-1)[0].item(), dtype=torch.from_numpy(v).dtype,
                      device=shape.device)


def _shape(x, start=0, end=None):
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64, device=x.device)


def _squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    for a in sorted((v % x.dim() for v in _ints(axes)), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(x, axes):
    ax = sorted(_ints(axes))
    n = x.dim() + len(ax)
    for a in (v % n for v in ax):
        x = x.unsqueeze(a)
    return x


def _split(x, split=None, axis=0, num_outputs=None):
    if split is None:
        n = num_outputs
        size = math.ceil(x.shape[axis] / n)
        return list(torch.split(x, size, dim=axis))
    return list(torch.split(x, _ints(split), dim=axis))


def _clip(x, lo=None, hi=None):
    return torch.clamp(x, lo, hi)


# op -> f(*inputs, **attributes); inputs past the attributes stay positional, missing ones are None
OPS = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": torch.pow,
    "MatMul": torch.matmul, "Gemm": _gemm, "Conv": _conv, "Erf": torch.erf, "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log,
    "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Round": torch.round,
    "Max": lambda *xs: _fold(torch.maximum, xs), "Min": lambda *xs: _fold(torch.minimum, xs),
    "Equal": torch.eq, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "Less": torch.lt, "Not": torch.logical_not,
    "Where": torch.where, "Identity": lambda x: x, "Dropout": lambda x, *_, **__: x,
    "Softmax": lambda x, axis=-1: torch.softmax(x, axis),
    "Gelu": lambda x, approximate="none": F.gelu(x, approximate=approximate if isinstance(approximate, str)
                                                  else approximate.decode()),
    "LayerNormalization": _layer_norm, "Transpose": lambda x, perm=None: x.permute(
        *(perm if perm is not None else range(x.dim() - 1, -1, -1))),
    "Reshape": _reshape, "Flatten": lambda x, axis=1: x.reshape(
        (int(np.prod(x.shape[:axis])), -1)),
    "Slice": _slice, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Concat": lambda *xs, axis: torch.cat(xs, axis), "Gather": _gather, "Shape": _shape, "Expand": _expand,
    "Pad": _pad, "Cast": _cast, "Range": _range, "ConstantOfShape": _const_of_shape, "Split": _split,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "Clip": _clip,
}


def _fold(fn, xs):
    y = xs[0]
    for x in xs[1:]:
        y = fn(y, x)
    return y


def unsupported_ops(nodes) -> set[str]:
    return {n.op_type for n in nodes if n.op_type not in OPS and n.op_type != "Constant"}


class Segment(torch.nn.Module):
    """Nodes `nodes` of a graph, run in order, from tensors `inputs` to tensors `outputs`.

    `params`: initializer names that become trainable parameters. `hooks[(node, input_index)]`:
    a function applied to that input before the node runs (fake quantizers); used when
    `forward(..., quant=True)`.
    """

    def __init__(self, nodes, consts: dict[str, np.ndarray], inputs: list[str], outputs: list[str],
                 params: tuple[str, ...] = (), hooks: dict | None = None):
        super().__init__()
        bad = unsupported_ops(nodes)
        if bad:
            raise NotImplementedError(f"ops not supported by the reconstruction interpreter: {sorted(bad)}")
        consts = dict(consts)
        for n in nodes:
            if n.op_type == "Constant":
                consts[n.output[0]] = numpy_helper.to_array(_attrs(n)["value"])
        nodes = [n for n in nodes if n.op_type != "Constant"]
        self.nodes = [(n.name, n.op_type, list(n.input), list(n.output), _attrs(n)) for n in nodes]
        self.inputs, self.outputs = list(inputs), list(outputs)
        need = {x for n in nodes for x in n.input if x}
        self.param_names = [p for p in params if p in need]
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.from_numpy(np.array(consts[p], np.float32))) for p in self.param_names])
        self.consts = {k: torch.from_numpy(np.array(v)) for k, v in consts.items()
                       if k in need and k not in self.param_names}
        self.hooks = dict(hooks or {})

    def param(self, name: str) -> torch.nn.Parameter:
        return self.weights[self.param_names.index(name)]

    def forward(self, *xs, quant: bool = True):
        env = dict(zip(self.inputs, xs))
        env.update(self.consts)
        env.update(zip(self.param_names, self.weights))
        for name, op, ins, outs, at in self.nodes:
            args = [env[x] if x else None for x in ins]
            if quant:
                for i in range(len(args)):
                    h = self.hooks.get((name, i))
                    if h is not None:
                        args[i] = h(args[i])
            while args and args[-1] is None:
                args.pop()
            y = OPS[op](*args, **at)
            if isinstance(y, (list, tuple)):
                env.update(zip(outs, y))
            else:
                env[outs[0]] = y
        return tuple(env[o] for o in self.outputs)
