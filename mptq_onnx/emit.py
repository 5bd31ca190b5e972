"""Writing quantizers into an ONNX graph.

Two modes share one editor:
- ``qdq``: what users deploy. QuantizeLinear/DequantizeLinear pairs (INT8/UINT8, INT4/UINT4 at
  4 bits, other widths in an 8-bit container with a Clip on the integer codes), weights stored as
  integers (INT4 packed two per byte), region-wise quantizers as two QDQ branches split at zero,
  SULQ as a QDQ pair on log2(x + η) followed by Round, Pow(2, ·) and Sub(η).
- ``sim``: the same arithmetic in float ops (Div, Round, Clip, Mul) whose scales, zero points and
  clamp bounds are graph inputs with defaults, so one onnxruntime session can score many bit-width
  configurations by feeding new values (Greedy MP) instead of rebuilding the graph.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .quantizers import Quantizer, quantize_int

LN2 = float(np.log(2.0))


def int4_tensor(name: str, ints: np.ndarray, signed: bool = True) -> TensorProto:
    """An INT4/UINT4 initializer, packed two values per byte (low nibble first)."""
    u = (ints.astype(np.int16).reshape(-1) & 0x0F).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    packed = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.INT4 if signed else TensorProto.UINT4
    t.dims.extend(ints.shape)
    t.raw_data = packed.tobytes()
    return t


def _container(bits: int, signed: bool) -> tuple[int, np.dtype | None, bool]:
    """(ONNX type, numpy type for non-4-bit, needs a Clip) for integer codes of `bits` bits."""
    if bits == 4:
        return (TensorProto.INT4 if signed else TensorProto.UINT4), None, False
    return (TensorProto.INT8 if signed else TensorProto.UINT8), (np.int8 if signed else np.uint8), bits != 8


class Editor:
    def __init__(self, model: onnx.ModelProto, mode: str = "qdq"):
        assert mode in ("qdq", "sim")
        self.model = model
        self.mode = mode
        self.before: dict[str, list[onnx.NodeProto]] = {}
        self.inits: list[TensorProto] = []
        self.feed_inputs: list[onnx.ValueInfoProto] = []
        self.defaults: dict[str, np.ndarray] = {}
        self.rewire: dict[str, dict[int, str]] = {}
        self.node_meta: dict[str, dict[str, str]] = {}
        self.drop_inits: set[str] = set()
        self._names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
        self._names |= {i.name for i in model.graph.input}

    # -- naming and constants -------------------------------------------------------------------
    def name(self, base: str) -> str:
        n, k = base, 1
        while n in self._names:
            n = f"{base}_{k}"
            k += 1
        self._names.add(n)
        return n

    def const(self, base: str, value, feed: bool = False, tensor: TensorProto | None = None) -> str:
        n = self.name(base)
        if tensor is not None:
            tensor.name = n
            self.inits.append(tensor)
            return n
        arr = np.asarray(value)
        self.inits.append(numpy_helper.from_array(arr, n))
        if feed:
            self.feed_inputs.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(arr.dtype),
                                                                  list(arr.shape)))
            self.defaults[n] = arr
        return n

    def node(self, at: str, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.name(base)
        self.before.setdefault(at, []).append(
            helper.make_node(op, inputs, [out], name=self.name(base + "_" + op), **attrs))
        return out

    # -- activations ----------------------------------------------------------------------------
    def act(self, at: str, x: str, q: Quantizer, base: str, feed: bool = False) -> tuple[str, dict]:
        """Quantize tensor `x` for node `at`; returns the new tensor and the names of fed params."""
        if q.kind == "uniform":
            return self._uniform(at, x, q, base, feed)
        if q.kind == "region":
            return self._region(at, x, q, base, feed)
        if q.kind == "log2":
            return self._log2(at, x, q, base, feed)
        if q.kind == "sulq":
            return self._sulq(at, x, q, base, feed)
        raise ValueError(q.kind)

    def _uniform(self, at, x, q, base, feed):
        s = np.asarray(q.scale, np.float32)
        if self.mode == "sim":
            p = {"scale": self.const(base + "_s", s, feed),
                 "zp": self.const(base + "_z", np.asarray(q.zero_point, np.float32), feed),
                 "lo": self.const(base + "_lo", np.float32(q.qmin), feed),
                 "hi": self.const(base + "_hi", np.float32(q.qmax), feed)}
            t = self.node(at, "Div", [x, p["scale"]], base + "_div")
            t = self.node(at, "Round", [t], base + "_rnd")
            t = self.node(at, "Add", [t, p["zp"]], base + "_addz")
            t = self.node(at, "Clip", [t, p["lo"], p["hi"]], base + "_clip")
            t = self.node(at, "Sub", [t, p["zp"]], base + "_subz")
            return self.node(at, "Mul", [t, p["scale"]], base + "_fq"), p
        signed = q.qmin < 0
        ttype, npt, clip = _container(q.bits, signed)
        sn = self.const(base + "_scale", s)
        if npt is None:
            zp = helper.make_tensor("zp", ttype, list(np.shape(q.zero_point)),
                                    np.asarray(q.zero_point).reshape(-1).tolist())
            zn = self.const(base + "_zero_point", None, tensor=zp)
        else:
            zn = self.const(base + "_zero_point", np.asarray(q.zero_point).astype(npt))
        ax = {"axis": q.axis} if q.axis is not None and np.ndim(s) == 1 else {}  # per-channel activations
        t = self.node(at, "QuantizeLinear", [x, sn, zn], base + "_q", **ax)
        if clip:
            t = self.node(at, "Clip", [t, self.const(base + "_qmin", npt(q.qmin)),
                                       self.const(base + "_qmax", npt(q.qmax))], base + "_qclip")
        return self.node(at, "DequantizeLinear", [t, sn, zn], base + "_dq", **ax), {}

    def _region(self, at, x, q, base, feed):
        zero = self.const(base + "_zero", np.float32(0))
        pos = self.node(at, "Relu", [x], base + "_pos")
        neg = self.node(at, "Min", [x, zero], base + "_neg")
        if self.mode == "sim":
            p = {"scale": self.const(base + "_s", np.asarray(q.scale, np.float32), feed),
                 "neg_scale": self.const(base + "_sn", np.float32(q.neg_scale), feed),
                 "hi": self.const(base + "_hi", np.float32(q.qmax), feed),
                 "lo": self.const(base + "_lo", np.float32(q.qmin), feed)}
            a = self.node(at, "Div", [pos, p["scale"]], base + "_pdiv")
            a = self.node(at, "Round", [a], base + "_prnd")
            a = self.node(at, "Clip", [a, zero, p["hi"]], base + "_pclip")
            a = self.node(at, "Mul", [a, p["scale"]], base + "_pfq")
            b = self.node(at, "Div", [neg, p["neg_scale"]], base + "_ndiv")
            b = self.node(at, "Round", [b], base + "_nrnd")
            b = self.node(at, "Clip", [b, p["lo"], zero], base + "_nclip")
            b = self.node(at, "Mul", [b, p["neg_scale"]], base + "_nfq")
            return self.node(at, "Add", [a, b], base + "_fq"), p
        sp = self.const(base + "_pos_scale", np.asarray(q.scale, np.float32))
        zp = self.const(base + "_pos_zero_point", np.uint8(0))
        a = self.node(at, "QuantizeLinear", [pos, sp, zp], base + "_pos_q")
        a = self.node(at, "Clip", [a, self.const(base + "_pos_qmin", np.uint8(0)),
                                   self.const(base + "_pos_qmax", np.uint8(q.qmax))], base + "_pos_qclip")
        a = self.node(at, "DequantizeLinear", [a, sp, zp], base + "_pos_dq")
        sn = self.const(base + "_neg_scale", np.float32(q.neg_scale))
        zn = self.const(base + "_neg_zero_point", np.int8(0))
        b = self.node(at, "QuantizeLinear", [neg, sn, zn], base + "_neg_q")
        b = self.node(at, "Clip", [b, self.const(base + "_neg_qmin", np.int8(q.qmin)),
                                   self.const(base + "_neg_qmax", np.int8(0))], base + "_neg_qclip")
        b = self.node(at, "DequantizeLinear", [b, sn, zn], base + "_neg_dq")
        return self.node(at, "Add", [a, b], base + "_region"), {}

    def _log2(self, at, x, q, base, feed):
        # standard float ops: e = clip(rint(-k·log2(x / s)), 0, qmax); x̂ = s·2^(-e/k), the top code is 0
        k = q.steps_per_octave
        p = {"scale": self.const(base + "_s", np.asarray(q.scale, np.float32), feed),
             "hi": self.const(base + "_hi", np.float32(q.qmax), feed),
             "to_code": self.const(base + "_mkoln2", np.float32(-k / LN2), feed),
             "from_code": self.const(base + "_m1ok", np.float32(-1.0 / k), feed)}
        zero = self.const(base + "_zero", np.float32(0))
        t = self.node(at, "Div", [x, p["scale"]], base + "_div")
        t = self.node(at, "Max", [t, self.const(base + "_tiny", np.float32(1e-30))], base + "_pos")
        t = self.node(at, "Log", [t], base + "_log")
        t = self.node(at, "Mul", [t, p["to_code"]], base + "_nlog2")
        e = self.node(at, "Round", [t], base + "_rnd")
        e = self.node(at, "Clip", [e, zero, p["hi"]], base + "_code")
        v = self.node(at, "Pow", [self.const(base + "_two", np.float32(2)),
                                  self.node(at, "Mul", [e, p["from_code"]], base + "_negcode")], base + "_pow")
        v = self.node(at, "Mul", [v, p["scale"]], base + "_val")
        top = self.node(at, "GreaterOrEqual", [e, p["hi"]], base + "_istop")
        return self.node(at, "Where", [top, zero, v], base + "_log2q"), p

    def _sulq(self, at, x, q, base, feed):
        # x̂ = 2^rint(DQ(Q(log2(x + η)))) - η; log2 = ln · (1/ln 2), as the numpy reference computes it
        eta = self.const(base + "_eta", np.float32(q.shift), feed)
        t = self.node(at, "Add", [x, eta], base + "_shift")
        t = self.node(at, "Max", [t, self.const(base + "_tiny", np.float32(1e-30))], base + "_pos")
        t = self.node(at, "Log", [t], base + "_ln")
        t = self.node(at, "Mul", [t, self.const(base + "_inv_ln2", np.float32(1.0 / LN2))], base + "_log2")
        u = dataclasses.replace(q, kind="uniform", shift=0.0)
        t, p = self._uniform(at, t, u, base + "_log", feed)
        t = self.node(at, "Round", [t], base + "_exp")
        t = self.node(at, "Pow", [self.const(base + "_two", np.float32(2)), t], base + "_pow")
        t = self.node(at, "Sub", [t, eta], base + "_sulq")
        return t, ({**p, "shift": eta} if self.mode == "sim" else {})

    # -- weights --------------------------------------------------------------------------------
    def weight(self, at: str, w_name: str, w: np.ndarray, q: Quantizer, base: str,
               feed: bool = False) -> tuple[str, dict]:
        if self.mode == "sim":
            shape = [1] * w.ndim
            shape[q.axis] = -1
            p = {"scale": self.const(base + "_s", np.asarray(q.scale, np.float32).reshape(shape), feed),
                 "lo": self.const(base + "_lo", np.float32(q.qmin), feed),
                 "hi": self.const(base + "_hi", np.float32(q.qmax), feed)}
            t = self.node(at, "Div", [w_name, p["scale"]], base + "_div")
            t = self.node(at, "Round", [t], base + "_rnd")
            t = self.node(at, "Clip", [t, p["lo"], p["hi"]], base + "_clip")
            return self.node(at, "Mul", [t, p["scale"]], base + "_fq"), p
        ints = quantize_int(w, q)
        if q.bits == 4:
            wn = self.const(base + "_quantized", None, tensor=int4_tensor("w", ints, signed=True))
        else:
            wn = self.const(base + "_quantized", ints.astype(np.int8))
        sn = self.const(base + "_scale", np.asarray(q.scale, np.float32))
        self.drop_inits.add(w_name)
        return self.node(at, "DequantizeLinear", [wn, sn], base + "_dq", axis=q.axis), {}

    # -- finishing -------------------------------------------------------------------------------
    def use(self, node: str, input_index: int, tensor: str) -> None:
        self.rewire.setdefault(node, {})[input_index] = tensor

    def annotate(self, node: str, meta: dict[str, str]) -> None:
        self.node_meta.setdefault(node, {}).update(meta)

    def finish(self, inplace: bool = False) -> onnx.ModelProto:
        """The edited model: a copy, or (`inplace`) the model given, edited (one copy of the
        weights less at the peak, where the caller drops the original anyway)."""
        m = self.model
        if not inplace:
            m = onnx.ModelProto()
            m.CopyFrom(self.model)
        g = m.graph
        nodes = []
        for n in g.node:
            nodes += self.before.get(n.name, [])
            for i, t in self.rewire.get(n.name, {}).items():
                n.input[i] = t
            meta = self.node_meta.get(n.name)
            if meta:
                for k, v in meta.items():
                    n.metadata_props.add(key=k, value=v)
                n.doc_string = "mptq: " + ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in meta.items())
            nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)
        still_used = {x for n in g.node for x in n.input}
        keep = [t for t in g.initializer if t.name not in self.drop_inits or t.name in still_used]
        del g.initializer[:]
        g.initializer.extend(keep + self.inits)
        g.input.extend(self.feed_inputs)
        return m
