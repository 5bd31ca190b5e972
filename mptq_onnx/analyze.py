"""Graph analysis: find the quantizable sites of a ViT/DeiT/Swin graph and the roles the methods need.

A *site* is a node whose inputs get quantized: the patch-embedding Conv, every Linear (MatMul with a
constant weight, with or without its bias Add, or Gemm), and the two activation-activation MatMuls
of attention (Q·Kᵀ and attn·V). Each activation input carries a *kind* (post-LayerNorm,
post-GELU, post-Softmax, ...) which selects the quantizer a method uses for it.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx

from .errors import MptqError
from .graph import GraphIndex, attr, node_scope
from .modelio import model_shell

# ops that move or select tokens without mixing channels (the last axis)
_TRANSPARENT = {"Reshape", "Transpose", "Slice", "Concat", "Squeeze", "Unsqueeze", "Gather", "Pad",
                "Identity", "Dropout", "ReduceMean", "Expand", "Flatten"}
_LAYOUT = {"Reshape", "Transpose", "Identity", "Dropout", "Cast", "Squeeze", "Unsqueeze", "Slice"}
_GELU_OPS = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu"}


@dataclasses.dataclass
class ActInput:
    tensor: str          # the tensor that gets a quantizer
    kind: str            # post_ln | post_gelu | post_softmax | image | general
    ln: str | None = None  # LayerNormalization node feeding it (post_ln only)


@dataclasses.dataclass
class Site:
    name: str            # readable, stable: the torch module path where known
    op: str              # linear | conv | act_matmul
    role: str            # patch_embed | qkv | proj | fc1 | fc2 | head | reduction | qk | av | linear
    node: str            # the MatMul / Gemm / Conv node
    inputs: list[ActInput]
    weight: str | None = None
    w_out_axis: int = 0  # output-channel axis of the weight initializer
    w_in_axis: int = 1
    bias: str | None = None
    bias_node: str | None = None  # the Add that carries a MatMul's bias
    block: str | None = None
    n_params: int = 0
    out_tensor: str = ""  # output of the site (after bias where there is one)


@dataclasses.dataclass
class LnGroup:
    """A LayerNormalization whose output reaches only linear sites, through channel-preserving ops."""
    ln: str
    sites: list[str]
    exact: bool          # every path is pure data movement / averaging, so a per-channel affine map commutes
    gamma: str
    beta: str | None


@dataclasses.dataclass
class GraphInfo:
    sites: list[Site]
    ln_groups: list[LnGroup]
    input_name: str
    output_name: str
    family: str

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def by_role(self, *roles: str) -> list[Site]:
        return [s for s in self.sites if s.role in roles]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for s in self.sites:
            counts[s.role] = counts.get(s.role, 0) + 1
        return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return model


def _axes(gi: GraphIndex, node: onnx.NodeProto, input_idx: int = 1, attr_name: str = "axes"):
    a = attr(node, attr_name)
    if a is None and len(node.input) > input_idx and node.input[input_idx]:
        c = gi.const(node.input[input_idx])
        a = None if c is None else c.reshape(-1).tolist()
    return a


def _keeps_channels(gi: GraphIndex, node: onnx.NodeProto, x: str) -> tuple[bool, bool]:
    """(channel axis preserved, exact for a per-channel affine map) for `node` consuming `x`."""
    op = node.op_type
    if op not in _TRANSPARENT:
        return False, False
    out = node.output[0]
    r_in, r_out = gi.rank(x), gi.rank(out)
    c_in, c_out = gi.last_dim(x), gi.last_dim(out)
    if c_in is None or c_out is None or c_in != c_out or not isinstance(c_in, int):
        return False, False
    if op == "Transpose":
        perm = attr(node, "perm")
        return (perm is not None and perm[-1] == len(perm) - 1), True
    if op in ("Slice", "Squeeze", "Unsqueeze", "ReduceMean"):
        axes = _axes(gi, node, 3 if op == "Slice" else 1)
        if axes is None:  # Squeeze of all unit dims / ReduceMean over all: channel dim survived above
            return op == "Squeeze", True
        rank = r_in if op != "Unsqueeze" else r_out
        if rank is None:
            return False, False
        return all((a % rank) != rank - 1 for a in axes), True
    if op in ("Concat", "Gather"):
        a = attr(node, "axis", 0)
        rank = r_out if op == "Concat" else r_in
        if rank is None or a % rank == rank - 1:
            return False, False
        if op == "Gather" and node.input[0] != x:
            return False, False
        return True, True
    if op == "Pad":
        pads = gi.const(node.input[1]) if len(node.input) > 1 else None
        if pads is None:  # computed from shapes (TorchScript's Swin windows): what it did on the probe run
            s_in, s_out = gi.shapes.get(x), gi.shapes.get(out)
            same = s_in is not None and s_out is not None and len(s_in) == len(s_out) and all(
                isinstance(a, int) and a == b for a, b in zip(s_in[1:], s_out[1:]))
            return True, same
        return True, bool(np.all(pads == 0))
    if op == "Expand":
        return node.input[0] == x, True
    return True, True  # Reshape / Identity / Dropout / Flatten with the channel dim unchanged


def _trace_to_ln(gi: GraphIndex, tensor: str, depth: int = 0) -> tuple[str | None, bool]:
    """Follow `tensor` backwards through channel-preserving ops to a single LayerNormalization."""
    if depth > 24:
        return None, False
    p = gi.producer.get(tensor)
    if p is None:
        return None, False
    if p.op_type == "LayerNormalization":
        ax = attr(p, "axis", -1)
        return (p.name, True) if ax in (-1, (gi.rank(tensor) or 0) - 1) else (None, False)
    ok, exact = _keeps_channels(gi, p, p.input[0])
    if not ok:
        return None, False
    data_inputs = [x for x in p.input[:1] if x] if p.op_type != "Concat" else [x for x in p.input if x]
    found, all_exact = None, exact
    for x in data_inputs:
        ln, ex = _trace_to_ln(gi, x, depth + 1)
        if ln is None or (found is not None and ln != found):
            return None, False
        found, all_exact = ln, all_exact and ex
    return found, all_exact


def _is_post_gelu(gi: GraphIndex, tensor: str) -> bool:
    p = gi.producer.get(tensor)
    if p is None:
        return False
    if p.op_type in _GELU_OPS:
        return True
    if p.op_type != "Mul":
        return False
    frontier, seen = [p], 0
    while frontier and seen < 6:  # x * 0.5 * (1 + erf(x / sqrt2)), or its tanh form
        n = frontier.pop()
        seen += 1
        if n.op_type in ("Erf", "Tanh"):
            return True
        frontier += [gi.producer[x] for x in n.input if x in gi.producer and not gi.is_const(x)]
    return False


def _through_layout(gi: GraphIndex, tensor: str, ops: set[str]) -> onnx.NodeProto | None:
    p = gi.producer.get(tensor)
    for _ in range(6):
        if p is None:
            return None
        if p.op_type in ops:
            return p
        if p.op_type not in _LAYOUT:
            return None
        p = gi.producer.get(p.input[0])
    return None


def _leads_to_softmax(gi: GraphIndex, tensor: str) -> bool:
    frontier = [tensor]
    for _ in range(8):
        nxt = []
        for t in frontier:
            for c in gi.consumers.get(t, []):
                if c.op_type == "Softmax":
                    return True
                if c.op_type in _LAYOUT | {"Add", "Mul", "Div", "Where", "Sub"}:
                    nxt.append(c.output[0])
        frontier = nxt
    return False


def _act_kind(gi: GraphIndex, tensor: str) -> tuple[str, str | None]:
    if tensor in gi.graph_inputs:
        return "image", None
    ln, _ = _trace_to_ln(gi, tensor)
    if ln is not None:
        return "post_ln", ln
    if _is_post_gelu(gi, tensor):
        return "post_gelu", None
    if _through_layout(gi, tensor, {"Softmax"}) is not None:
        return "post_softmax", None
    return "general", None


# names second: structure (see _structure) decides q/k/v/qkv/proj/fc1/fc2 wherever it finds them
_ROLE_SUFFIX = [("qkv", "qkv"), ("attn.proj", "proj"), ("fc1", "fc1"), ("fc2", "fc2"),
                ("reduction", "reduction"), ("head", "head"), ("head.fc", "head"), ("classifier", "head"),
                ("patch_embed.proj", "patch_embed"), ("patch_embeddings.projection", "patch_embed")]


def _role_from_name(name: str) -> str | None:
    for suffix, role in _ROLE_SUFFIX:
        if name == suffix or name.endswith("." + suffix):
            return role
    return None


def _block_of(name: str) -> str | None:
    """timm's blocks.N / layers.N.blocks.M; Hugging Face's encoder.layer.N / layers.N(.blocks.M)."""
    m = re.match(r"(.*?(?:blocks|layers|layer)\.\d+(?:\.blocks\.\d+)?)", name)
    return m.group(1) if m else None


# fused ops of onnxruntime's transformer optimizer (optimum --optimize): the blocks vanish into them
_FUSED_OPS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization",
              "Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention", "BiasGelu",
              "FastGelu", "GemmFastGelu", "BiasSplitGelu", "BiasAdd", "SkipGroupNorm"}


def _probe_shapes(model: onnx.ModelProto, gi: GraphIndex, input_hw, cache: dict | None) -> None:
    """Concrete shapes, from one onnxruntime run on a zero image, of the tensors whose channel
    width shape inference left unknown: Reshape/Pad on shapes computed at run time (TorchScript's
    Swin windows) would otherwise hide every LayerNorm -> Linear path behind them. Needs the
    input's height and width (static in the graph, else `input_hw`); `cache` keeps the answers
    between analyses of one conversion (tensor names do not change)."""
    want = [o for n in gi.graph.node if n.op_type in _TRANSPARENT for o in n.output[:1]
            if o and not isinstance(gi.last_dim(o), int) and gi.types.get(o) == onnx.TensorProto.FLOAT]
    # a Pad whose pads are computed: whether it padded at all needs both whole shapes
    for n in gi.graph.node:
        if n.op_type == "Pad" and len(n.input) > 1 and not gi.is_const(n.input[1]):
            want += [t for t in (n.input[0], n.output[0]) if t not in want and gi.types.get(t) == onnx.TensorProto.FLOAT
                     and not all(isinstance(d, int) for d in (gi.shapes.get(t) or [None, None])[1:])]
    if not want:
        return
    cache = {} if cache is None else cache
    todo = [t for t in want if t not in cache]
    x = gi.graph_inputs[0]
    dims = list(gi.shapes.get(x) or [])
    if todo and len(dims) == 4:
        if not all(isinstance(d, int) for d in dims[2:]):
            if input_hw is None:
                todo = []
            else:
                dims[2:] = [int(v) for v in input_hw]
        if not isinstance(dims[1], int):  # optimum leaves the channels open too: the patch Conv's
            conv = next((n for n in gi.graph.node if n.op_type == "Conv" and n.input[0] == x), None)
            w = gi.initializers.get(conv.input[1]) if conv is not None else None
            dims[1] = int(w.dims[1]) if w is not None else None
        if todo and isinstance(dims[1], int):
            from .calibrate import lean_copy
            from .runtime import make_session
            try:
                lean, external = lean_copy(model, todo)
                sess = make_session(lean, external=external)
                outs = sess.run(todo, {x: np.zeros([1] + dims[1:], np.float32)})
                cache.update({t: list(v.shape) for t, v in zip(todo, outs)})
            except Exception:  # shapes are a refinement: the analysis stands without them
                cache.update({t: None for t in todo})
    for t in want:
        s = cache.get(t)
        if s is not None:
            gi.shapes[t] = [None] + s[1:]  # the batch axis stays unknown


def analyze(model: onnx.ModelProto, input_hw=None, shape_cache: dict | None = None) -> GraphInfo:
    """`input_hw`: the image height and width where the graph leaves them dynamic (from the
    preprocessing); `shape_cache`: see _probe_shapes."""
    # shapes from the weightless shell: inferring on the model itself serialized and copied every
    # weight (a 1.3 GB peak on vit_base, each time a pass invalidated the analysis)
    gi = GraphIndex(model, shapes_from=_infer_shapes(model_shell(model)).graph)
    if not gi.graph_inputs or not gi.graph_outputs:
        raise MptqError("the graph has no inputs or outputs")
    fused = sorted({n.op_type for n in gi.graph.node if n.op_type in _FUSED_OPS})
    if fused:
        raise MptqError(f"the graph holds onnxruntime's fused transformer ops ({', '.join(fused)}), which hide the "
                        "layers the passes rewrite: export without optimization (optimum-cli export onnx without "
                        "--optimize; no onnxruntime.transformers optimizer) and convert that")
    _probe_shapes(model, gi, input_hw, shape_cache)
    sites: list[Site] = []
    used: set[str] = set()

    def unique(name: str) -> str:
        base, k = name, 1
        while name in used:
            name = f"{base}_{k}"
            k += 1
        used.add(name)
        return name

    for node in gi.graph.node:
        op = node.op_type
        scope = node_scope(node)
        if op == "Conv" and gi.is_const(node.input[1]):
            w = gi.const(node.input[1])
            x = node.input[0]
            kind, ln = _act_kind(gi, x)
            name = unique(scope or node.name)
            sites.append(Site(name, "conv", "patch_embed" if kind == "image" or "patch" in name else "linear",
                              node.name, [ActInput(x, kind, ln)], weight=node.input[1], w_out_axis=0,
                              w_in_axis=1, bias=node.input[2] if len(node.input) > 2 and node.input[2] else None,
                              block=_block_of(name), n_params=int(w.size), out_tensor=node.output[0]))
        elif op == "Gemm" and gi.is_const(node.input[1]) and not attr(node, "transA", 0):
            w = gi.const(node.input[1])
            if w.ndim != 2:
                continue
            tb = attr(node, "transB", 0)
            x = node.input[0]
            kind, ln = _act_kind(gi, x)
            name = unique(scope or node.name)
            role = _role_from_name(name) or ("head" if node.output[0] in gi.graph_outputs else "linear")
            sites.append(Site(name, "linear", role, node.name, [ActInput(x, kind, ln)], weight=node.input[1],
                              w_out_axis=0 if tb else 1, w_in_axis=1 if tb else 0,
                              bias=node.input[2] if len(node.input) > 2 and node.input[2] else None,
                              block=_block_of(name), n_params=int(w.size), out_tensor=node.output[0]))
        elif op == "MatMul":
            a, b = node.input[0], node.input[1]
            if gi.is_const(b):
                w = gi.const(b)
                if w is None or w.ndim != 2:
                    continue
                kind, ln = _act_kind(gi, a)
                bias = bias_node = None
                out = node.output[0]
                cons = gi.consumers.get(out, [])
                if len(cons) == 1 and cons[0].op_type == "Add":
                    other = [x for x in cons[0].input if x != out]
                    if len(other) == 1 and gi.is_const(other[0]):
                        bv = gi.const(other[0])
                        if bv is not None and bv.size == w.shape[1] and bv.ndim <= 1:
                            bias, bias_node, out = other[0], cons[0].name, cons[0].output[0]
                name = unique(scope or node.name)
                role = _role_from_name(name)
                if role is None:
                    if out in gi.graph_outputs:
                        role = "head"
                    elif kind == "post_gelu":
                        role = "fc2"
                    elif kind == "post_ln" and w.shape[1] == 3 * w.shape[0]:
                        role = "qkv"
                    else:
                        role = "linear"
                sites.append(Site(name, "linear", role, node.name, [ActInput(a, kind, ln)], weight=b,
                                  w_out_axis=1, w_in_axis=0, bias=bias, bias_node=bias_node,
                                  block=_block_of(name), n_params=int(w.size), out_tensor=out))
            elif not gi.is_const(a):
                ka, _ = _act_kind(gi, a)
                if ka == "post_softmax":
                    role = "av"
                elif _leads_to_softmax(gi, node.output[0]):
                    role = "qk"
                else:
                    role = "act_matmul"
                base = scope or node.name
                if scope and role in ("qk", "av"):
                    base = f"{scope}.{'q@k' if role == 'qk' else 'attn@v'}"
                name = unique(base)
                ins = [ActInput(a, ka if role == "av" else "general"), ActInput(b, "general")]
                sites.append(Site(name, "act_matmul", role, node.name, ins, block=_block_of(name),
                                  out_tensor=node.output[0]))

    n_lin = sum(s.op == "linear" for s in sites)
    n_att = sum(s.role in ("qk", "av") for s in sites)
    n_ln = sum(n.op_type == "LayerNormalization" for n in gi.graph.node)
    if n_lin == 0 or n_att == 0 or n_ln == 0:
        raise MptqError(
            "not a ViT/DeiT/Swin graph: found "
            f"{n_lin} Linear layers (MatMul/Gemm with a constant weight), {n_att} attention MatMuls "
            f"(Q·Kᵀ / attn·V around a Softmax) and {n_ln} LayerNormalization nodes; all three are needed "
            "(export with `mptq-onnx export`, which keeps attention unfused"
            + ("; LayerNorms split into ReduceMean/Sub/Pow/Sqrt/Div by an export below opset 17 are "
               "fused when they follow torch's pattern: re-export at opset 17 or later if yours do not"
               if n_ln == 0 else "") + ")")

    _structure(gi, sites)
    ln_groups = _ln_groups(gi, sites)
    # Swin by name, or by structure: its stages widen (LayerNorms of several widths; a ViT's are one)
    widths = {gi.last_dim(n.output[0]) for n in gi.graph.node if n.op_type == "LayerNormalization"}
    family = "swin" if any("window" in (n.name + (node_scope(n) or "")) for n in gi.graph.node) or \
        any(s.role == "reduction" for s in sites) or len(widths - {None}) > 1 else "vit"
    return GraphInfo(sites, ln_groups, gi.graph_inputs[0], gi.graph_outputs[0], family)


def _ln_groups(gi: GraphIndex, sites: list[Site]) -> list[LnGroup]:
    by_input: dict[str, list[Site]] = {}
    for s in sites:
        if s.op == "linear":
            by_input.setdefault(s.inputs[0].tensor, []).append(s)
    groups = []
    for node in gi.graph.node:
        if node.op_type != "LayerNormalization" or not gi.is_const(node.input[1]):
            continue
        reached: list[str] = []
        ok, exact = True, True
        frontier = [node.output[0]]
        while frontier and ok:
            t = frontier.pop()
            if t in gi.graph_outputs:
                ok = False
                break
            cons = gi.consumers.get(t, [])
            if not cons:
                ok = False
            for c in cons:
                if c.op_type in ("Shape", "Size"):
                    continue  # reads only the shape, which the rescaling keeps
                lin = [s for s in by_input.get(t, []) if s.node == c.name]
                if lin:
                    reached += [s.name for s in lin]
                    continue
                keep, ex = _keeps_channels(gi, c, t)
                if not keep:
                    ok = False
                    break
                exact = exact and ex
                frontier.append(c.output[0])
        if ok and reached:
            beta = node.input[2] if len(node.input) > 2 and node.input[2] and gi.is_const(node.input[2]) else None
            groups.append(LnGroup(node.name, sorted(set(reached), key=reached.index), exact, node.input[1], beta))
    return groups


# --------------------------------------------------------------------------- structure

# between a Linear's output and the attention MatMul it feeds: head split, transposes, the qkv
# unbind, and the 1/sqrt(d) scale (a Mul/Div by a constant)
_TO_ATTN = _LAYOUT | {"Split", "Gather", "Slice", "Squeeze", "Unsqueeze", "Mul", "Div", "Concat", "Expand"}
_GELU_PARTS = {"Mul", "Add", "Div", "Erf", "Tanh", "Pow", "Gelu", "FastGelu", "Sigmoid", "Identity", "Cast"}


def _back_to_site(gi: GraphIndex, tensor: str, by_out: dict[str, Site], through: set[str],
                  limit: int = 12) -> Site | None:
    """The Linear site whose output reaches `tensor` through `through` ops only (one data path:
    multi-input ops are followed along their one non-constant input)."""
    t = tensor
    for _ in range(limit):
        if t in by_out:
            return by_out[t]
        p = gi.producer.get(t)
        if p is None or p.op_type not in through:
            return None
        data = [x for x in p.input if x and not gi.is_const(x)]
        if p.op_type in ("Reshape", "Gather", "Slice", "Split", "Expand", "Squeeze", "Unsqueeze", "Pad"):
            data = [p.input[0]]  # the rest (shape, indices, starts, pads) is shape arithmetic
        if len(data) != 1:
            return None
        t = data[0]
    return None


def _gelu_source(gi: GraphIndex, tensor: str, by_out: dict[str, Site], limit: int = 12) -> Site | None:
    """The one Linear site whose output the GELU producing `tensor` is computed from (its erf/tanh
    form branches, so every non-constant input is followed)."""
    found, seen, frontier = set(), set(), [tensor]
    while frontier and len(seen) < limit:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in by_out:
            found.add(t)
            continue
        p = gi.producer.get(t)
        if p is None or p.op_type not in _GELU_PARTS:
            return None
        frontier += [x for x in p.input if x and not gi.is_const(x)]
    return by_out[found.pop()] if len(found) == 1 and not frontier else None


def _forward_to_site(gi: GraphIndex, tensor: str, by_in: dict[str, list[Site]], limit: int = 8) -> Site | None:
    """The one Linear site `tensor` reaches through layout ops (attn·V -> merge heads -> proj)."""
    t = tensor
    for _ in range(limit):
        sites = by_in.get(t, [])
        if len(sites) == 1:
            return sites[0]
        cons = [c for c in gi.consumers.get(t, []) if c.op_type not in ("Shape", "Size")]
        if len(cons) != 1 or cons[0].op_type not in _LAYOUT:
            return None
        t = cons[0].output[0]
    return None


def _structure(gi: GraphIndex, sites: list[Site]) -> None:
    """Roles and blocks from the graph's structure, in place: each attention unit (its Q, K, V
    Linears, fused or separate, Q·Kᵀ, attn·V, the output projection) and the MLP after it
    (fc1 -> GELU -> fc2) is one block. Names decided these before; they still name the block where
    they agree with the structure (timm's blocks.N, Hugging Face's layer.N), and give the roles
    structure does not (patch embedding, Swin's reduction)."""
    by_out = {s.out_tensor: s for s in sites if s.op == "linear"}
    by_in: dict[str, list[Site]] = {}
    for s in sites:
        if s.op == "linear":
            by_in.setdefault(s.inputs[0].tensor, []).append(s)
    order = {n.name: i for i, n in enumerate(gi.graph.node)}
    units = []
    for qk in (s for s in sites if s.role == "qk"):
        q = _back_to_site(gi, qk.inputs[0].tensor, by_out, _TO_ATTN)
        k = _back_to_site(gi, qk.inputs[1].tensor, by_out, _TO_ATTN)
        if q is None or k is None:
            continue
        # the attn·V fed (through the mask/bias adds, Softmax and layout ops) by this Q·Kᵀ
        av = next((s for s in sites if s.role == "av" and _reaches(gi, qk.out_tensor, s.inputs[0].tensor)), None)
        v = _back_to_site(gi, av.inputs[1].tensor, by_out, _TO_ATTN) if av is not None else None
        proj = _forward_to_site(gi, av.out_tensor, by_in) if av is not None else None
        units.append((qk, av, q, k, v, proj))
    for qk, av, q, k, v, proj in units:
        if q is k and (v is None or v is q):
            q.role = "qkv"
        elif len({id(q), id(k), id(v)}) == 3:
            q.role, k.role, v.role = "q", "k", "v"
        if proj is not None and proj.role not in ("head",):
            proj.role = "proj"
    for fc2 in (s for s in sites if s.op == "linear" and s.inputs[0].kind == "post_gelu"):
        fc1 = _gelu_source(gi, fc2.inputs[0].tensor, by_out)
        if fc1 is not None and fc1 is not fc2 and fc2.role != "head":
            fc1.role, fc2.role = "fc1", "fc2"
    # blocks: a unit's sites and the MLP that follows it, up to the next unit
    if not units:
        return
    units.sort(key=lambda u: order[u[0].node])
    starts = [min(order[s.node] for s in u if s is not None) for u in units]
    members: list[list[Site]] = [[s for s in u if s is not None] for u in units]
    for s in sites:
        if s.role in ("fc1", "fc2"):
            i = max((j for j, st in enumerate(starts) if st < order[s.node]), default=None)
            if i is not None:
                members[i].append(s)
    for j, ms in enumerate(members):
        named = {s.block for s in ms}
        if len(named) == 1 and None not in named:
            continue  # the names agree with the structure: keep them (readable, stable)
        for s in ms:
            s.block = f"block{j}"


def _reaches(gi: GraphIndex, src: str, dst: str, limit: int = 12) -> bool:
    """Whether `dst` is computed from `src` within `limit` single-consumer steps (Q·Kᵀ -> scale ->
    bias/mask adds -> Softmax -> attn·V's input)."""
    frontier = [src]
    for _ in range(limit):
        if dst in frontier:
            return True
        nxt = []
        for t in frontier:
            for c in gi.consumers.get(t, []):
                if c.op_type not in ("MatMul", "Shape", "Size"):
                    nxt += [o for o in c.output if o]
        frontier = nxt
    return dst in frontier
