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
import onnxruntime as ort

from .calibrate import EXTERNAL_BYTES, external_placeholder, session, tensor_nbytes
from .emit import LN2, Editor
from .modelio import model_shell
from .quantizers import Quantizer, sulq_quantizer


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
                 threads: int | None = None, providers=None):
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
        self.threads, self.providers = threads, providers
        self.sess = session(self.model, threads, providers=providers)
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
        if kind == "sulq":  # finite at any width (scale 1 would reach 2^255 at 8 bits: inf · flag 0 = NaN)
            return sulq_quantizer(0.0, 1.0, q0.bits, 0.01)
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
            elif k == "shift":
                v = np.float32(q.shift)
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


class TailScorer:
    """Runs configurations that differ from a base one only in some fed parameters, from the last
    cut of the graph before the first node those parameters reach.

    A *cut* is a point of the topological order where few activations are alive (between two
    transformer blocks, only the residual stream). The base configuration's activations at the
    cuts are computed once; a configuration that changes a quantizer in block k then runs blocks
    k.. only, on them. Greedy MP's sensitivity pass changes one quantizer at a time from the
    all-high configuration, so on average it runs half the network per evaluation.
    """

    MAX_LIVE = 1  # activations crossing a cut: the residual stream (a larger value adds cuts, and sessions)

    def __init__(self, sim: Simulator, images: np.ndarray, base_feeds: dict[str, np.ndarray],
                 threads: int | None = None, max_cuts: int | None = None):
        """`max_cuts`: use at most that many cuts, evenly spread (fewer sessions to build, at the
        cost of running a little more of the network per configuration)."""
        self.sim, self.images, self.base, self.threads = sim, images, dict(base_feeds), threads
        g = sim.model.graph
        self.nodes = list(g.node)
        graph_inputs = {i.name for i in g.input}
        # tensors that do not depend on the image: weights, fed parameters and what is computed
        # from them only (fake-quantized weights); a tail recomputes those it needs
        const = {t.name for t in g.initializer} | graph_inputs - {sim.in_name}
        self.const_node = []
        for n in self.nodes:
            c = all(x in const for x in n.input if x)
            self.const_node.append(c)
            if c:
                const.update(o for o in n.output if o)
        self.ok = not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                          for n in self.nodes for a in n.attribute)
        last_use: dict[str, int] = {}
        self.first_use: dict[str, int] = {}  # first non-constant node a graph input reaches
        reach = {x: {x} for x in graph_inputs}
        for i, n in enumerate(self.nodes):
            for x in n.input:
                last_use[x] = i
            srcs = set().union(*(reach.get(x, set()) for x in n.input if x))
            if self.const_node[i]:
                for o in n.output:
                    reach[o] = srcs
            else:
                for x in srcs:
                    self.first_use.setdefault(x, i)
        self.cuts: dict[int, tuple[str, ...]] = {}  # node index -> activations alive just before it
        live = {sim.in_name}
        for i, n in enumerate(self.nodes):
            live = {t for t in live if last_use.get(t, -1) >= i}
            if i > 0 and 0 < len(live) <= self.MAX_LIVE and sim.in_name not in live:
                self.cuts[i] = tuple(sorted(live))
            live.update(o for o in n.output if o and o not in const)
        self._positions = sorted(self.cuts)
        if max_cuts and len(self._positions) > max_cuts:
            keep = np.linspace(0, len(self._positions) - 1, max_cuts).round().astype(int)
            self._positions = [self._positions[i] for i in sorted(set(keep))]
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._sess: dict[int, tuple] = {}  # cut -> (session, its input names)
        self._types: dict[str, onnx.ValueInfoProto] | None = None
        # weights reach this scorer's sessions as arrays, not serialized into each one's model: with
        # a session per cut, that serializing (and onnxruntime's parsing) took ~20 s of Swin's Greedy MP
        self._big = {t.name: (external_placeholder(t), ort.OrtValue.ortvalue_from_numpy(onnx.numpy_helper.to_array(t)))
                     for t in g.initializer if tensor_nbytes(t) >= EXTERNAL_BYTES}

    def start(self, feeds: dict[str, np.ndarray]) -> int:
        """The cut a configuration runs from (0: the whole graph)."""
        if not self.ok or not feeds:
            return 0
        first = min(self.first_use.get(k, 0) for k in feeds)
        best = 0
        for c in self._positions:
            if c > first:
                break
            best = c
        return best

    def _value_info(self, t: str) -> onnx.ValueInfoProto:
        if self._types is None:
            inferred = onnx.shape_inference.infer_shapes(model_shell(self.sim.model)).graph.value_info
            self._types = {v.name: v for v in inferred}
        v = self._types.get(t)
        return v if v is not None else onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)

    def prepare(self, feed_sets: list[dict[str, np.ndarray]]) -> None:
        """Compute, in one pass, the base activations at every cut these configurations start from."""
        self._prepare_cuts({self.start(f) for f in feed_sets})

    def _prepare_cuts(self, cuts: set[int]) -> None:
        need = sorted(cuts - {0} - set(self._cache))
        if not need:
            return
        names = sorted({t for c in need for t in self.cuts[c]})
        src = self.sim.model.graph
        sess = self._session(self.nodes, list(src.input), list(src.output) + [self._value_info(t) for t in names],
                             f"{src.name}_cuts")
        got: dict[str, list[np.ndarray]] = {t: [] for t in names}
        for i in range(0, len(self.images), 64):
            for t, v in zip(names, sess.run(names, {self.sim.in_name: self.images[i:i + 64], **self.base})):
                got[t].append(v)
        arrays = {t: np.concatenate(v, axis=0) for t, v in got.items()}
        for c in need:
            self._cache[c] = {t: arrays[t] for t in self.cuts[c]}

    def _tail(self, c: int):
        if c not in self._sess:
            # one tail session at a time: each keeps its weights and its own arena, and held for
            # every cut at once they were most of Greedy MP's 8.7 GB on deit_small (callers run
            # the configurations of one cut together: see GreedyMP)
            self._sess.clear()
            src = self.sim.model.graph
            # nodes from the cut on, and the constant nodes before it that they use
            need = {x for n in self.nodes[c:] for x in n.input}
            pre = []
            for i in range(c - 1, -1, -1):
                n = self.nodes[i]
                if self.const_node[i] and any(o in need for o in n.output):
                    pre.append(n)
                    need.update(n.input)
            nodes = pre[::-1] + self.nodes[c:]
            inputs = [self._value_info(t) for t in self.cuts[c]]
            inputs += [i for i in src.input if i.name in need and i.name != self.sim.in_name]
            self._sess[c] = (self._session(nodes, inputs, list(src.output), f"{src.name}_from{c}"),
                             {i.name for i in inputs})
        return self._sess[c]

    def _session(self, nodes: list[onnx.NodeProto], inputs: list, outputs: list, name: str):
        """A session over `nodes` of the simulation graph, with the initializers they use; the large
        ones as placeholders whose values go to onnxruntime as arrays."""
        need = {x for n in nodes for x in n.input}
        inits = [t for t in self.sim.model.graph.initializer if t.name in need]
        g = onnx.helper.make_graph(nodes, name, inputs, outputs,
                                   [self._big[t.name][0] if t.name in self._big else t for t in inits])
        m = onnx.helper.make_model(g, opset_imports=self.sim.model.opset_import, ir_version=self.sim.model.ir_version)
        return session(m, self.threads or getattr(self.sim, "threads", None),
                       {t.name: self._big[t.name][1] for t in inits if t.name in self._big},
                       providers=getattr(self.sim, "providers", None))

    def run_rows(self, feeds: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
        """Logits of images[idx] (one batch) with `feeds` on top; fed arrays are per row of idx
        or broadcast."""
        full = {**self.base, **feeds}
        c = self.start(feeds)
        if c == 0:
            return self.sim.run(self.images[idx], full, max(len(idx), 1))
        self._prepare_cuts({c})
        sess, names = self._tail(c)
        acts = {t: a[idx] for t, a in self._cache[c].items()}
        return sess.run([self.sim.out_name], {**acts, **{k: v for k, v in full.items() if k in names}})[0]

    def run(self, feeds: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
        """Logits of the base configuration with `feeds` applied on top."""
        full = {**self.base, **feeds}
        c = self.start(feeds)
        if c == 0:
            return self.sim.run(self.images, full, batch)
        self._prepare_cuts({c})
        sess, names = self._tail(c)
        fed = {k: v for k, v in full.items() if k in names}
        acts = self._cache[c]
        out = []
        for i in range(0, len(self.images), batch):
            out.append(sess.run([self.sim.out_name], {**{t: a[i:i + batch] for t, a in acts.items()}, **fed})[0])
        return np.concatenate(out, axis=0)
