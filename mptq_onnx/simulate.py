"""Fast scoring of many bit-width configurations with one onnxruntime session.

The float model gets fake-quant nodes whose scales, zero points and clamp bounds are graph inputs
with defaults (onnxruntime lets a feed override them). A slot whose candidate quantizers differ in
kind (uniform or log2 for post-Softmax, say) gets one branch per kind, mixed by fed 0/1 flags.
Changing a configuration is then a new feed dict, not a new session.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .calibrate import session
from .emit import LN2, Editor
from .quantizers import Quantizer


def as_region(q: Quantizer) -> Quantizer:
    """A uniform per-tensor quantizer written as the equivalent region-wise one."""
    if q.kind != "uniform":
        return q
    z = int(np.asarray(q.zero_point).reshape(-1)[0])
    s = float(np.asarray(q.scale).reshape(-1)[0])
    return Quantizer("region", q.bits, np.array(s, np.float32), np.array(0, np.int32), q.qmin - z, q.qmax - z,
                     neg_scale=s, method=q.method)


@dataclasses.dataclass
class Slot:
    site: str
    key: str                 # 'w' or 'a0', 'a1'
    node: str
    tensor: str              # quantized tensor (weight initializer or activation)
    input_index: int
    kinds: list[str]
    params: dict[str, dict] = dataclasses.field(default_factory=dict)  # kind -> fed param names
    flags: dict[str, str] = dataclasses.field(default_factory=dict)    # kind -> flag input name


class Simulator:
    def __init__(self, model: onnx.ModelProto, slots: list[Slot], init: dict[tuple[str, str], Quantizer],
                 threads: int | None = None):
        """`init[(site, key)]` gives each slot's starting quantizer (its kind's branch is enabled)."""
        ed = Editor(model, "sim")
        weights = {t.name: t for t in model.graph.initializer}
        self.slots = {(s.site, s.key): s for s in slots}
        for s in slots:
            q0 = init[(s.site, s.key)]
            outs = []
            for kind in s.kinds:
                base = f"sim_{s.site}_{s.key}_{kind}".replace(".", "_").replace("@", "_")
                qk = self._example(q0, kind)
                if s.key == "w":
                    w = onnx.numpy_helper.to_array(weights[s.tensor])
                    out, names = ed.weight(s.node, s.tensor, w, qk, base, feed=True)
                else:
                    out, names = ed.act(s.node, s.tensor, qk, base, feed=True)
                s.params[kind] = names
                if len(s.kinds) > 1:
                    flag = ed.const(base + "_on", np.float32(1.0 if kind == self._kind(q0, s) else 0.0), True)
                    s.flags[kind] = flag
                    out = ed.node(s.node, "Mul", [out, flag], base + "_sel")
                outs.append(out)
            y = outs[0]
            for o in outs[1:]:
                y = ed.node(s.node, "Add", [y, o], f"sim_{s.site}_{s.key}_mix".replace(".", "_"))
            ed.use(s.node, s.input_index, y)
        self.model = ed.finish()
        self.defaults = dict(ed.defaults)
        self.sess = session(self.model, threads)
        self.in_name = self.sess.get_inputs()[0].name
        self.out_name = self.sess.get_outputs()[0].name

    @staticmethod
    def _kind(q: Quantizer, slot: Slot) -> str:
        return "region" if "region" in slot.kinds and q.kind == "uniform" else q.kind

    @staticmethod
    def _example(q0: Quantizer, kind: str) -> Quantizer:
        if kind == q0.kind:
            return q0
        if kind == "region":
            return as_region(q0)
        # a placeholder of the right kind; its values are replaced by feeds before use
        return Quantizer(kind, q0.bits, np.array(1.0, np.float32), np.array(0, np.int32), 0, (1 << q0.bits) - 1)

    def feeds(self, site: str, key: str, q: Quantizer | None) -> dict[str, np.ndarray]:
        """Feed values that make slot (site, key) apply `q`."""
        s = self.slots[(site, key)]
        kind = self._kind(q, s)
        if kind == "region":
            q = as_region(q)
        if kind not in s.params:
            raise ValueError(f"slot {site}/{key} was built for {s.kinds}, not a {kind} quantizer")
        out: dict[str, np.ndarray] = {}
        names = s.params[kind]
        for k, n in names.items():
            ref = self.defaults[n]
            if k == "scale":
                v = np.asarray(q.scale, np.float32).reshape(ref.shape)
            elif k == "zp":
                v = np.asarray(q.zero_point, np.float32).reshape(ref.shape)
            elif k == "lo":
                v = np.float32(q.qmin)
            elif k == "hi":
                v = np.float32(q.qmax)
            elif k == "neg_scale":
                v = np.float32(q.neg_scale)
            elif k == "to_code":
                v = np.float32(-q.steps_per_octave / LN2)
            elif k == "from_code":
                v = np.float32(-1.0 / q.steps_per_octave)
            else:
                raise KeyError(k)
            out[n] = np.asarray(v, np.float32)
        for k, flag in s.flags.items():
            out[flag] = np.array(1.0 if k == kind else 0.0, np.float32)
        return out

    def run(self, images: np.ndarray, feeds: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
        outs = []
        for i in range(0, len(images), batch):
            outs.append(self.sess.run([self.out_name], {self.in_name: images[i:i + batch], **feeds})[0])
        return np.concatenate(outs, axis=0)


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(softmax(ref) ‖ softmax(logits)) over the batch."""
    def logsoftmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lp, lq = logsoftmax(ref_logits.astype(np.float64)), logsoftmax(logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())
