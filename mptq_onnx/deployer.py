"""`deploy`: lower a converted (QDQ simulation) model into what stock onnxruntime runs fastest.

`convert` writes a faithful simulation at any bit-width; onnxruntime's CPU kernels only cover
some of its forms. Layer by layer, from the bits in the model:

- 8-bit weights and activations (and weights of 2-3, 5-7 bits, whose codes fit int8 exactly):
  per-tensor activation QDQ + per-channel weight DQ directly in front of a MatMul, which
  onnxruntime fuses into MatMulIntegerToFloat / QLinearMatMul. Forms that block the fusion are
  rewritten first, each exactly:
  * Gemm (the head) -> MatMul + Add, with the weight codes transposed;
  * a patch-embedding Conv (kernel = stride, no padding) -> Reshape/Transpose + MatMul (im2col);
  * activations below 8 bits (INT4/UINT4 QDQ, or an 8-bit container with a Clip on the codes)
    -> a float Clip at the same bounds before an 8-bit QuantizeLinear with the same scale and
    zero point: rint(clip(x, s(qmin-z), s(qmax-z)) / s) + z equals clip(rint(x/s) + z, qmin, qmax);
  * region-wise (two-branch) activations -> two integer MatMuls, one per branch, added: the
    product is linear, so (x̂+ + x̂-) W = x̂+ W + x̂- W.
- 4-bit weights: com.microsoft.MatMulNBits (per-channel scales written as block-wise scales, one
  scale repeated per block), its input the simulated activation as it is. accuracy_level 1
  computes in float32 (the simulation's arithmetic); 4 requantizes the input to int8 blocks,
  which is a different computation: its accuracy has to be measured.
- Anything else (log2 activations, per-channel activation scales) stays as simulated, reported.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .emit import int4_tensor
from .errors import MptqError
from .graph import attr
from .modelio import get_metadata, load_model, model_shell, save_model, set_metadata
from .passes.qdq import METADATA_KEY

DEPLOY_KEY = "mptq.deploy"
F32 = np.float32
INTEGER_KERNELS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul",
                   "QGemm", "QLinearConv", "ConvInteger"}
_RANGES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255),
           TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}


# MatMulNBits' accuracy levels offered: 1 computes in float32 (what the QDQ graph says), 4 with int8
# input blocks (fast). 2 and 3 (fp16, bf16) run as 1 on the CPU, 0 leaves it to onnxruntime.
ACCURACY_LEVELS = (1, 4)


@dataclasses.dataclass
class DeployConfig:
    w4: str = "nbits"           # 4-bit weights: nbits (MatMulNBits) | int8 (widened, integer kernels)
    accuracy_level: int = 4     # MatMulNBits: 1 = float32 compute (exact), 4 = int8 input blocks
    block_size: int = 0         # MatMulNBits block size; 0: the largest of 128..16 dividing K
    verify: bool = True         # read back which kernel onnxruntime chose for every layer

    def validate(self) -> None:
        if self.w4 not in ("nbits", "int8"):
            raise MptqError(f"--w4 takes nbits or int8, got {self.w4!r}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise MptqError(f"--accuracy-level takes {' or '.join(map(str, ACCURACY_LEVELS))}, got {self.accuracy_level}")
        if self.block_size and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise MptqError(f"--block-size must be a power of two >= 16, got {self.block_size}")


@dataclasses.dataclass
class LayerDeploy:
    site: str
    role: str
    w_bits: str
    a_bits: str
    form: str                   # integer | nbits | simulated
    exact: bool                 # same quantized values as the simulation (float sums may reorder)
    kernel: str = "?"           # op type onnxruntime's optimized graph runs it with
    note: str = ""


@dataclasses.dataclass
class DeployReport:
    input: str
    output: str
    config: dict
    layers: list[LayerDeploy]
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)  # optimized graph op counts
    session_options: dict = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        from .inspect import table
        rows = [[r.site, r.role, r.w_bits, r.a_bits, r.form, r.kernel, "yes" if r.exact else "NO", r.note]
                for r in self.layers]
        return table(rows, ["site", "role", "W", "A", "form", "onnxruntime kernel", "exact", "note"])


# -- reading the simulation's quantizers back from the graph ------------------------------------

@dataclasses.dataclass
class _Uniform:
    x: str                      # the float tensor quantized
    scale: str                  # initializer names, reused
    zp: str
    zp_type: int
    qmin: int
    qmax: int
    s: float
    z: int


@dataclasses.dataclass
class _Region:
    x: str
    pos: _Uniform               # pos.x = Relu(x), neg.x = Min(x, 0)
    neg: _Uniform


@dataclasses.dataclass
class _Weight:
    ints: np.ndarray            # int codes, as stored
    scale: np.ndarray
    axis: int
    bits: int


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.prod = {o: n for n in model.graph.node for o in n.output}
        self.names = set(self.inits) | set(self.prod) | {n.name for n in model.graph.node} | {
            i.name for i in model.graph.input}
        self.new_inits: list[TensorProto] = []

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def name(self, base: str) -> str:
        n, k = base, 1
        while n in self.names:
            n, k = f"{base}_{k}", k + 1
        self.names.add(n)
        return n

    def add_const(self, base: str, value: np.ndarray | None = None, tensor: TensorProto | None = None) -> str:
        n = self.name(base)
        t = tensor if tensor is not None else numpy_helper.from_array(np.asarray(value), n)
        t.name = n
        self.new_inits.append(t)
        self.inits[n] = t
        return n

    def uniform(self, t: str) -> _Uniform | None:
        dq = self.prod.get(t)
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            return None
        s, z = self.const(dq.input[1]), self.const(dq.input[2])
        if s is None or z is None or s.size != 1 or z.size != 1:
            return None
        p, lo, hi = self.prod.get(dq.input[0]), None, None
        if p is not None and p.op_type == "Clip":
            lo, hi = self.const(p.input[1]), self.const(p.input[2])
            if lo is None or hi is None:
                return None
            p = self.prod.get(p.input[0])
        if p is None or p.op_type != "QuantizeLinear" or list(p.input[1:3]) != list(dq.input[1:3]):
            return None
        ztype = self.inits[dq.input[2]].data_type
        if ztype not in _RANGES:
            return None
        qmin, qmax = _RANGES[ztype]
        if lo is not None:
            qmin, qmax = max(qmin, int(lo)), min(qmax, int(hi))
        return _Uniform(p.input[0], dq.input[1], dq.input[2], ztype, qmin, qmax, float(s.reshape(())),
                        int(z.reshape(())))

    def act(self, t: str) -> _Uniform | _Region | None:
        u = self.uniform(t)
        if u is not None:
            return u
        add = self.prod.get(t)
        if add is None or add.op_type != "Add":
            return None
        a, b = self.uniform(add.input[0]), self.uniform(add.input[1])
        if a is None or b is None:
            return None
        ra, rb = self.prod.get(a.x), self.prod.get(b.x)
        if ra is None or rb is None or ra.op_type != "Relu" or rb.op_type != "Min" or ra.input[0] != rb.input[0]:
            return None
        return _Region(ra.input[0], a, b)

    def weight(self, t: str, bits: int) -> _Weight | None:
        dq = self.prod.get(t)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in self.inits:
            return None
        if len(dq.input) > 2 and dq.input[2]:
            z = self.const(dq.input[2])
            if z is None or np.any(z != 0):
                return None
        ints, s = self.const(dq.input[0]), self.const(dq.input[1])
        if s is None:
            return None
        return _Weight(ints.astype(np.int32), s.astype(F32), int(attr(dq, "axis", 1)), bits)


def _site_meta(n: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in n.metadata_props if p.key.startswith("mptq.") and p.key != DEPLOY_KEY}


def _weight_dq(g: _Graph, base: str, ints: np.ndarray, scale: np.ndarray, axis: int, int4: bool,
               nodes: list) -> str:
    t = int4_tensor("w", ints, signed=True) if int4 else numpy_helper.from_array(ints.astype(np.int8), "w")
    wn = g.add_const(base + "_quantized", tensor=t)
    sn = g.add_const(base + "_scale", scale.astype(F32))
    out = g.name(base + "_dq")
    nodes.append(helper.make_node("DequantizeLinear", [wn, sn], [out], name=g.name(base + "_dq_node"), axis=axis))
    return out


def _requant(g: _Graph, u: _Uniform, x: str, base: str, nodes: list) -> str:
    """The simulation's QDQ of `u`, re-emitted on tensor `x` (same initializers)."""
    q = g.name(base + "_q")
    nodes.append(helper.make_node("QuantizeLinear", [x, u.scale, u.zp], [q], name=g.name(base + "_q_node")))
    lo, hi = _RANGES[u.zp_type]
    if (u.qmin, u.qmax) != (lo, hi):
        dt = helper.tensor_dtype_to_np_dtype(u.zp_type) if u.zp_type in (TensorProto.INT8, TensorProto.UINT8) else None
        if dt is None:  # 4-bit codes with a narrower range do not occur; refuse rather than guess
            raise MptqError(f"unexpected clipped 4-bit quantizer on {u.x}")
        c = g.name(base + "_qclip")
        nodes.append(helper.make_node("Clip", [q, g.add_const(base + "_qmin", dt(u.qmin)),
                                               g.add_const(base + "_qmax", dt(u.qmax))], [c],
                                      name=g.name(base + "_qclip_node")))
        q = c
    out = g.name(base + "_dq")
    nodes.append(helper.make_node("DequantizeLinear", [q, u.scale, u.zp], [out], name=g.name(base + "_dq_node")))
    return out


def _int8_act(g: _Graph, u: _Uniform, x: str, base: str, nodes: list) -> str:
    """Per-tensor QDQ in an 8-bit type, the narrower range as a float Clip before it (exact)."""
    signed = u.qmin < 0
    ttype = TensorProto.INT8 if signed else TensorProto.UINT8
    npt = np.int8 if signed else np.uint8
    if u.zp_type == ttype and (u.qmin, u.qmax) == _RANGES[ttype]:
        sn, zn = u.scale, u.zp
    else:
        s = F32(u.s)
        sn = u.scale
        zn = g.add_const(base + "_zero_point8", npt(u.z))
        # rint(lo / s) = qmin - z exactly: lo is s (qmin - z) rounded once, |qmin - z| < 256
        lo, hi = F32(s * F32(u.qmin - u.z)), F32(s * F32(u.qmax - u.z))
        c = g.name(base + "_clip")
        nodes.append(helper.make_node("Clip", [x, g.add_const(base + "_lo", lo), g.add_const(base + "_hi", hi)],
                                      [c], name=g.name(base + "_clip_node")))
        x = c
    q = g.name(base + "_q")
    nodes.append(helper.make_node("QuantizeLinear", [x, sn, zn], [q], name=g.name(base + "_q_node")))
    out = g.name(base + "_dq")
    nodes.append(helper.make_node("DequantizeLinear", [q, sn, zn], [out], name=g.name(base + "_dq_node")))
    return out


def _base(meta: dict[str, str], node: onnx.NodeProto) -> str:
    return "d_" + meta.get("mptq.site", node.name).replace(".", "_").replace("@", "_")


def _annotate(node: onnx.NodeProto, meta: dict[str, str], form: str) -> None:
    keep = [(p.key, p.value) for p in node.metadata_props if p.key not in meta and p.key != DEPLOY_KEY]
    del node.metadata_props[:]
    for k, v in keep + list(meta.items()) + [(DEPLOY_KEY, form)]:
        node.metadata_props.add(key=k, value=v)
    node.doc_string = "mptq: " + ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in meta.items()) + f", deploy={form}"


# -- step 1: Gemm and patch Conv become MatMul, so one lowering covers every linear layer --------

def _to_matmul(g: _Graph, node: onnx.NodeProto, shapes: dict[str, list]) -> tuple[list | None, str]:
    meta = _site_meta(node)
    base = _base(meta, node)
    bits = int(meta["mptq.w_bits"]) if meta.get("mptq.w_bits", "float") != "float" else 0
    w = g.weight(node.input[1], bits)
    if w is None:
        return None, "weight is not a constant per-channel DequantizeLinear"
    int4 = g.inits[g.prod[node.input[1]].input[0]].data_type in (TensorProto.INT4, TensorProto.UINT4)
    nodes: list = []
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            return None, "Gemm with transA/alpha/beta"
        ints, axis = (w.ints.T, 1 - w.axis) if attr(node, "transB", 0) else (w.ints, w.axis)
        a, u, out = node.input[0], g.act(node.input[0]), node.output[0]
        if isinstance(u, _Uniform):
            # onnxruntime turns a 2-D MatMul + Add back into a float Gemm before its QDQ fusions
            # see it: a [N, 1, K] product keeps it a MatMul (the QDQ commutes with the Unsqueeze)
            ax = g.add_const(base + "_axis1", np.asarray([1], np.int64))
            t = g.name(base + "_3d")
            nodes.append(helper.make_node("Unsqueeze", [u.x, ax], [t], name=g.name(base + "_unsqueeze")))
            a = _requant(g, u, t, base + "_in0", nodes)
            out = g.name(base + "_out3d")
        wq = _weight_dq(g, base + "_w", ints, w.scale, axis, int4, nodes)
        mm_out = g.name(base + "_mm") if bias or out != node.output[0] else out
        mm = helper.make_node("MatMul", [a, wq], [mm_out], name=node.name)
        nodes.append(mm)
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=g.name(base + "_bias")))
        else:
            out = mm_out
        if out != node.output[0]:
            nodes.append(helper.make_node("Squeeze", [out, ax], [node.output[0]], name=g.name(base + "_squeeze")))
        _annotate(mm, meta, "pending")
        return nodes, "Gemm -> MatMul + Add"
    # Conv: only the patch embedding's non-overlapping form is a plain matrix product
    k = list(attr(node, "kernel_shape", w.ints.shape[2:]))
    if (len(k) != 2 or list(attr(node, "strides", [1, 1])) != k or any(attr(node, "pads", [0] * 4))
            or attr(node, "group", 1) != 1 or any(d != 1 for d in attr(node, "dilations", [1, 1]))
            or attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None, "Conv other than kernel = stride, no padding"
    u = g.act(node.input[0])
    if u is not None and not isinstance(u, _Uniform):
        return None, "Conv input is not a per-tensor QDQ"
    x = u.x if u is not None else node.input[0]  # float input (--image-bits none): MatMulNBits still applies
    shp = shapes.get(x)
    if not shp or len(shp) != 4 or not all(isinstance(d, int) and d > 0 for d in shp[1:]):
        return None, "Conv input shape unknown"
    c, h, wd = shp[1:]
    kh, kw = k
    if h % kh or wd % kw:
        return None, "Conv input not a whole number of patches"
    o = w.ints.shape[0]
    ref = lambda v: g.add_const(base + "_shape", np.asarray(v, np.int64))  # noqa: E731
    t1 = g.name(base + "_patches6")
    nodes.append(helper.make_node("Reshape", [x, ref([0, c, h // kh, kh, wd // kw, kw])], [t1],
                                  name=g.name(base + "_reshape")))
    t2 = g.name(base + "_patchesT")
    nodes.append(helper.make_node("Transpose", [t1], [t2], name=g.name(base + "_transpose"), perm=[0, 2, 4, 1, 3, 5]))
    t3 = g.name(base + "_patches")
    nodes.append(helper.make_node("Reshape", [t2, ref([0, h // kh, wd // kw, c * kh * kw])], [t3],
                                  name=g.name(base + "_reshape")))
    a = _requant(g, u, t3, base + "_in0", nodes) if u else t3  # per-tensor QDQ commutes with moving elements
    wq = _weight_dq(g, base + "_w", w.ints.reshape(o, -1).T, w.scale, 1, int4, nodes)
    mm_out = g.name(base + "_mm")
    mm = helper.make_node("MatMul", [a, wq], [mm_out], name=node.name)
    nodes.append(mm)
    _annotate(mm, meta, "pending")
    if bias:
        b = g.name(base + "_bias")
        nodes.append(helper.make_node("Add", [mm_out, bias], [b], name=g.name(base + "_bias")))
        mm_out = b
    nodes.append(helper.make_node("Transpose", [mm_out], [node.output[0]], name=g.name(base + "_nchw"),
                                  perm=[0, 3, 1, 2]))
    return nodes, "Conv -> im2col MatMul"


# -- step 2: lower every MatMul site --------------------------------------------------------------

def _block_size(k: int, want: int) -> int:
    if want:
        return want
    for b in (128, 64, 32, 16):
        if k % b == 0:
            return b
    return 32


def _matmul_nbits(g: _Graph, node: onnx.NodeProto, w: _Weight, cfg: DeployConfig, base: str) -> onnx.NodeProto:
    """MatMulNBits from a [K, N] weight with per-output-channel (axis 1) scales."""
    ints = w.ints
    k, n = ints.shape
    bs = _block_size(k, cfg.block_size)
    nb = -(-k // bs)
    u = np.full((n, nb * bs), 8, np.uint8)      # default zero point 8: code q is stored as q + 8
    u[:, :k] = (ints.T + 8).astype(np.uint8)
    u = u.reshape(n, nb, bs)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)  # low nibble first
    scale = np.repeat(np.asarray(w.scale, F32).reshape(n, 1), nb, axis=1)
    bn = g.add_const(base + "_nbits_B", packed)
    sn = g.add_const(base + "_nbits_scales", scale)
    return helper.make_node("MatMulNBits", [node.input[0], bn, sn], list(node.output), name=node.name,
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=bs,
                            accuracy_level=cfg.accuracy_level)


def _lower_site(g: _Graph, node: onnx.NodeProto, cfg: DeployConfig) -> tuple[list, LayerDeploy]:
    meta = _site_meta(node)
    base = _base(meta, node)
    wb = meta.get("mptq.w_bits", "float")
    ab = meta.get("mptq.a_bits", "?")
    row = LayerDeploy(meta.get("mptq.site", node.name), meta.get("mptq.role", "?"), wb, ab, "simulated", True)
    if node.op_type != "MatMul":
        row.note = f"{node.op_type} kept"
        _annotate(node, meta, "simulated")
        return [node], row
    nodes: list = []
    if wb != "float":
        w = g.weight(node.input[1], int(wb))
        if w is None:
            row.note = "weight is not a constant per-channel DequantizeLinear"
            _annotate(node, meta, "simulated")
            return [node], row
        wt = g.inits[g.prod[node.input[1]].input[0]].data_type
        if wt in (TensorProto.INT4, TensorProto.UINT4) and cfg.w4 == "nbits":
            if w.ints.ndim != 2 or w.axis != 1 or w.scale.size != w.ints.shape[1]:
                row.note = "4-bit weight not per-output-channel"
                _annotate(node, meta, "simulated")
                return [node], row
            mm = _matmul_nbits(g, node, w, cfg, base)
            row.form = "nbits"
            row.exact = cfg.accuracy_level in (0, 1)
            row.note = (f"MatMulNBits block {mm.attribute[[a.name for a in mm.attribute].index('block_size')].i}, "
                        f"accuracy_level {cfg.accuracy_level}" + ("" if row.exact else " (int8 input blocks)"))
            _annotate(mm, meta, row.note)
            return [mm], row
        acts = [g.act(node.input[0])]
        wname = node.input[1]
        if wt in (TensorProto.INT4, TensorProto.UINT4):  # --w4 int8: the codes fit int8 exactly
            wname = _weight_dq(g, base + "_w8", w.ints, w.scale, w.axis, False, nodes)
    else:
        acts = [g.act(node.input[0]), g.act(node.input[1])]
        wname = None
    if any(a is None for a in acts):
        which = [i for i, a in enumerate(acts) if a is None]
        row.note = f"input {which[0]} is not a per-tensor uniform quantizer (log2 or per-channel): no integer kernel"
        _annotate(node, meta, "simulated")
        return [node], row
    if wname is None and any(isinstance(a, _Region) for a in acts):
        row.note = "region-wise input to an activation MatMul"
        _annotate(node, meta, "simulated")
        return [node], row
    row.form = "integer"
    if isinstance(acts[0], _Region):  # two integer products, one per region, summed
        r = acts[0]
        outs = []
        for part, u in (("pos", r.pos), ("neg", r.neg)):
            a = _int8_act(g, u, u.x, f"{base}_{part}", nodes)
            o = g.name(f"{base}_{part}_mm")
            mm = helper.make_node("MatMul", [a, wname], [o], name=g.name(f"{node.name}_{part}"))
            _annotate(mm, meta, f"integer ({part} region)")
            nodes.append(mm)
            outs.append(o)
        nodes.append(helper.make_node("Add", outs, list(node.output), name=g.name(base + "_regions")))
        row.note = "region-wise input: two integer MatMuls (one per sign) added"
        return nodes, row
    ins = [_int8_act(g, a, a.x, f"{base}_in{i}", nodes) for i, a in enumerate(acts)]
    mm = helper.make_node("MatMul", [ins[0], wname or ins[1]], list(node.output), name=node.name)
    notes = []
    if any((a.qmin, a.qmax) != _RANGES[TensorProto.INT8 if a.qmin < 0 else TensorProto.UINT8] for a in acts):
        notes.append(f"A{ab} codes in an 8-bit type behind a float Clip")
    if wb not in ("float", "8"):
        notes.append(f"W{wb} codes as int8")
    row.note = "; ".join(notes)
    _annotate(mm, meta, "integer")
    nodes.append(mm)
    return nodes, row


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing reads any more (the replaced QDQ chains)."""
    g = model.graph
    keep_out = {o.name for o in g.output}
    nodes = list(g.node)
    while True:
        used = keep_out | {x for n in nodes for x in n.input}
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in nodes for x in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)


def deploy(model: onnx.ModelProto, cfg: DeployConfig | None = None) -> tuple[onnx.ModelProto, list[LayerDeploy]]:
    """The lowered model and one entry per quantized layer (input model is not modified)."""
    cfg = cfg or DeployConfig()
    cfg.validate()
    if not get_metadata(model, METADATA_KEY):
        raise MptqError("not a model converted by mptq-onnx (no mptq.quantization metadata): "
                        "run `mptq-onnx convert` first")
    if get_metadata(model, DEPLOY_KEY):
        raise MptqError("this model was already deployed; deploy the converted model instead")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    shapes: dict[str, list] = {}
    if any(n.op_type == "Conv" and _site_meta(n) for n in m.graph.node):
        inferred = onnx.shape_inference.infer_shapes(model_shell(m))  # shapes only: no weights
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in vi.type.tensor_type.shape.dim]
    # step 1
    g = _Graph(m)
    new_nodes, notes = [], {}
    for n in m.graph.node:
        if _site_meta(n).get("mptq.site") and n.op_type in ("Gemm", "Conv") and _site_meta(n).get("mptq.w_bits", "float") != "float":
            repl, why = _to_matmul(g, n, shapes)
            notes[n.name] = why
            if repl is not None:
                new_nodes += repl
                continue
        new_nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    m.graph.initializer.extend(g.new_inits)
    # step 2
    g = _Graph(m)
    new_nodes, rows = [], []
    for n in m.graph.node:
        if not _site_meta(n).get("mptq.site"):
            new_nodes.append(n)
            continue
        repl, row = _lower_site(g, n, cfg)
        if notes.get(n.name):
            row.note = "; ".join(x for x in (notes[n.name], row.note) if x)
        new_nodes += repl
        rows.append(row)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    m.graph.initializer.extend(g.new_inits)
    _prune(m)
    if any(n.domain == "com.microsoft" for n in m.graph.node) and not any(
            o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.add(domain="com.microsoft", version=1)
    set_metadata(m, DEPLOY_KEY, json.dumps({"config": dataclasses.asdict(cfg), "session_options": {},
                                            "forms": dict(collections.Counter(r.form for r in rows))},
                                           sort_keys=True))
    return m, rows


# -- checking what onnxruntime makes of it --------------------------------------------------------

def optimized_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph a default onnxruntime CPU session runs (all optimizations, no session options)."""
    from .runtime import make_session
    with tempfile.TemporaryDirectory(prefix="mptq_deploy_") as d:
        make_session(path, exact_int4=False, optimized_path=Path(d) / "optimized.onnx")
        return onnx.load(Path(d) / "optimized.onnx")


def kernel_counts(opt: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in opt.graph.node).items()))


def site_kernels(deployed: onnx.ModelProto, opt: onnx.ModelProto) -> dict[str, list[str]]:
    """Site name -> op types onnxruntime runs its product(s) with (fusions keep the node name)."""
    by_name = {n.name: n.op_type for n in opt.graph.node}
    out: dict[str, list[str]] = {}
    for n in deployed.graph.node:
        meta = _site_meta(n)
        if "mptq.site" in meta:
            out.setdefault(meta["mptq.site"], []).append(by_name.get(n.name, "?"))
    return out


def report_path(dst: Path) -> Path:
    return dst.with_name(dst.stem + ".report.json")


def deploy_file(src: str | os.PathLike, dst: str | os.PathLike | None = None, cfg: DeployConfig | None = None,
                force: bool = False) -> DeployReport:
    cfg = cfg or DeployConfig()
    src = Path(src)
    dst = Path(dst) if dst else src.with_name(src.stem + ".deploy.onnx")
    if dst.resolve() == src.resolve():
        raise MptqError("the output path is the input model; choose another -o")
    if dst.exists() and not force:
        raise MptqError(f"{dst} exists; pass --force to overwrite it")
    model, rows = deploy(load_model(src), cfg)
    save_model(model, dst, force=force)
    rep = DeployReport(str(src), str(dst), dataclasses.asdict(cfg), rows)
    if cfg.verify:
        opt = optimized_graph(dst)
        rep.kernels = kernel_counts(opt)
        ks = site_kernels(model, opt)
        for r in rows:
            r.kernel = "+".join(ks.get(r.site, ["?"]))
            if r.form == "integer" and not all(k in INTEGER_KERNELS for k in ks.get(r.site, [])):
                rep.warnings.append(f"{r.site}: onnxruntime did not fuse it into an integer kernel ({r.kernel})")
    report_path(dst).write_text(json.dumps(rep.to_dict(), indent=1, sort_keys=True))
    return rep
