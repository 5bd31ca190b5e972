"""Canonicalize: opset 21 (INT4 QuantizeLinear/DequantizeLinear), named nodes, no dead code, and
no parameter shared between nodes."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import MptqError
from ..analyze import GraphInfo
from ..modelio import fill_shell, is_large_raw, model_shell
from ..graph import GraphIndex, attr, copy_node_metadata
from ..plan import Context
from .base import Pass, PassResult

TARGET_OPSET = 21


def canonicalize_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    done = []
    src_nodes = list(model.graph.node)  # the converter and graphsurgeon drop node metadata
    ops = {o.domain: o.version for o in model.opset_import}
    ver = ops.get("", ops.get("ai.onnx", 0))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger")
           for n in model.graph.node):
        raise MptqError("the model is already quantized (it has QuantizeLinear/DequantizeLinear or integer "
                        "ops); give the float model")
    floats = [i for i in model.graph.input if i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT
              and i.name not in {t.name for t in model.graph.initializer}]
    if floats:
        raise MptqError(f"input {floats[0].name!r} is not float32; export the model in float32")
    if ver < TARGET_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, TARGET_OPSET)
        except Exception:
            # the converter fails on adapters it lacks; raising the import in place is right only
            # where every op means the same at 21 (bump_opset checks that)
            from ..exporter import bump_opset
            try:
                model = bump_opset(model, TARGET_OPSET)
            except MptqError as e:
                raise MptqError(f"{e}; re-export the model at opset 17 or later (`mptq-onnx export`, or "
                                "torch.onnx.export(..., opset_version=17))") from None
        done.append(f"opset {ver}->{TARGET_OPSET}")
    copy_node_metadata(src_nodes, list(model.graph.node))  # before fusing: the LN takes its scope
    n_id = fold_const_identities(model)
    if n_id:
        done.append(f"{n_id} Identity nodes of initializers folded")
    n_ln = fuse_layernorm(model)
    if n_ln:
        done.append(f"fused {n_ln} decomposed LayerNorms")
        src_nodes = list(model.graph.node)
    if model.ir_version < 10:
        model.ir_version = 10  # INT4 tensors need IR 10
    # graphsurgeon's export copies every initializer twice (make_graph, then make_model): it gets
    # the model without the data of its large initializers, which are filled in after
    graph = gs.import_onnx(model_shell(model))
    n_before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    new = gs.export_onnx(graph, do_type_check=False)
    del graph
    fill_shell(new, {t.name: t for t in model.graph.initializer if is_large_raw(t)})
    # graphsurgeon drops model-level fields; keep ours
    new.ir_version = model.ir_version
    del new.opset_import[:]
    new.opset_import.extend(model.opset_import)
    del new.metadata_props[:]
    new.metadata_props.extend(model.metadata_props)
    new.producer_name, new.producer_version = model.producer_name, model.producer_version
    if len(new.graph.node) != n_before:
        done.append(f"removed {n_before - len(new.graph.node)} dead nodes")
    copy_node_metadata(src_nodes, list(new.graph.node))
    seen = set()
    for i, n in enumerate(new.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    return new, done


def fold_const_identities(model: onnx.ModelProto) -> int:
    """Read initializers directly where an Identity passed them on, in place; returns how many.

    The TorchScript exporter (and optimum with it) replaces repeated identical initializers by
    Identity nodes of the first one: zero biases and unit LayerNorm gains of fresh weights, the
    same weight in two places. Behind an Identity a parameter is not a constant to the analysis
    (a bias came out as None, and SQ-b found 1 of 9 LayerNorm groups); read directly, it is one
    shared initializer, which unshare_parameters then copies per consumer. The Identity nodes are
    left dead for the cleanup."""
    inits = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return 0
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            while x in alias:
                x = alias[x]
            if x != n.input[i]:
                n.input[i] = x
    return len(alias)


def _axes_last(gi: GraphIndex, node: onnx.NodeProto, x: str) -> bool:
    """Whether a ReduceMean reduces exactly the last axis of `x` and keeps dims."""
    if attr(node, "keepdims", 1) != 1:
        return False
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        c = gi.const(node.input[1])
        axes = None if c is None else c.reshape(-1).tolist()
    rank = gi.rank(x)
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _scalar(gi: GraphIndex, name: str) -> float | None:
    c = gi.const(name)
    return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None


def _only(gi: GraphIndex, tensor: str, op: str) -> onnx.NodeProto | None:
    cons = gi.consumers.get(tensor, [])
    return cons[0] if len(cons) == 1 and cons[0].op_type == op and tensor not in gi.graph_outputs else None


def _other(node: onnx.NodeProto, x: str) -> str | None:
    rest = [i for i in node.input if i != x]
    return rest[0] if len(rest) == 1 else None


def _match_layernorm(gi: GraphIndex, m1: onnx.NodeProto):
    """The nodes, γ, β, ε and output of x -> (x - mean) / sqrt(var + ε) [* γ] [+ β] starting at m1."""
    x = m1.input[0]
    if not _axes_last(gi, m1, x):
        return None
    sub = _only(gi, m1.output[0], "Sub")
    if sub is None or list(sub.input) != [x, m1.output[0]]:
        return None
    d = sub.output[0]
    cons = gi.consumers.get(d, [])
    sq = [c for c in cons if (c.op_type == "Pow" and c.input[0] == d and _scalar(gi, c.input[1]) == 2.0)
          or (c.op_type == "Mul" and list(c.input) == [d, d])]
    div = [c for c in cons if c.op_type == "Div" and c.input[0] == d]
    if len(cons) != 2 or len(sq) != 1 or len(div) != 1 or d in gi.graph_outputs:
        return None
    m2 = _only(gi, sq[0].output[0], "ReduceMean")
    if m2 is None or not _axes_last(gi, m2, sq[0].output[0]):
        return None
    add = _only(gi, m2.output[0], "Add")
    eps = None if add is None else _scalar(gi, _other(add, m2.output[0]) or "")
    sqrt = None if add is None else _only(gi, add.output[0], "Sqrt")
    if eps is None or sqrt is None or div[0].input[1] != sqrt.output[0] or len(gi.consumers[sqrt.output[0]]) != 1:
        return None
    nodes = [m1, sub, sq[0], m2, add, sqrt, div[0]]
    out, gamma, beta = div[0].output[0], None, None
    mul = _only(gi, out, "Mul")
    if mul is not None and gi.is_const(_other(mul, out) or ""):
        gamma, out = _other(mul, out), mul.output[0]
        nodes.append(mul)
    badd = _only(gi, out, "Add")
    if badd is not None and gi.is_const(_other(badd, out) or ""):
        beta, out = _other(badd, out), badd.output[0]
        nodes.append(badd)
    return nodes, gamma, beta, eps, out


def fuse_layernorm(model: onnx.ModelProto) -> int:
    """Replace LayerNorms that an export below opset 17 split into ReduceMean/Sub/Pow/Sqrt/Div
    (and Mul γ, Add β) by LayerNormalization nodes, in place; returns how many."""
    if not any(n.op_type == "ReduceMean" for n in model.graph.node):
        return 0
    gi = GraphIndex(model)
    try:  # shapes only: rank and width of the normalized tensor
        gi.shapes.update(GraphIndex(onnx.shape_inference.infer_shapes(model_shell(model))).shapes)
    except Exception:
        pass
    found = []
    for n in model.graph.node:
        if n.op_type == "ReduceMean" and n.domain in ("", "ai.onnx"):
            m = _match_layernorm(gi, n)
            if m is not None:
                found.append(m)
    if not found:
        return 0
    drop, new_inits = set(), []
    replace: dict[str, onnx.NodeProto] = {}
    for nodes, gamma, beta, eps, out in found:
        m1 = nodes[0]
        x = m1.input[0]
        if gamma is None or beta is None:
            c = gi.last_dim(x)
            if not isinstance(c, int):
                continue
            if gamma is None:
                gamma = f"{m1.name}_ln_gamma"
                new_inits.append(onnx.numpy_helper.from_array(np.ones(c, np.float32), gamma))
            if beta is None:
                beta = f"{m1.name}_ln_beta"
                new_inits.append(onnx.numpy_helper.from_array(np.zeros(c, np.float32), beta))
        base = m1.name.rsplit("/", 1)[0] + "/LayerNormalization" if "/" in m1.name else f"{m1.name}_LayerNorm"
        ln = onnx.helper.make_node("LayerNormalization", [x, gamma, beta], [out], name=base, axis=-1,
                                   epsilon=eps)
        ln.metadata_props.extend(m1.metadata_props)
        drop.update(id(k) for k in nodes)
        replace[id(nodes[-1])] = ln
    kept = []
    for n in model.graph.node:
        if id(n) in replace:
            kept.append(replace[id(n)])
        elif id(n) not in drop:
            kept.append(n)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(new_inits)
    return len(replace)


def check_skip(info, skip: tuple[str, ...]) -> None:
    """Every --skip entry must name a site or a role: a typo would quietly quantize the layer."""
    names = {s.name for s in info.sites}
    roles = sorted({s.role for s in info.sites})
    bad = [k for k in skip if k not in names and k not in roles]
    if bad:
        raise MptqError(f"--skip {bad[0]!r} matches no site or role of this model; roles: {', '.join(roles)}; "
                        f"sites are named like {info.sites[min(1, len(info.sites) - 1)].name!r} "
                        "(`mptq-onnx inspect MODEL` lists them)")


def unshare_parameters(model: onnx.ModelProto, info: GraphInfo) -> int:
    """Give every consumer of a shared parameter (a site's weight or bias, a LayerNorm's γ or β) its
    own copy; returns the number of copies made.

    The torch exporter merges identical initializers: with random or fresh weights all LayerNorm γ
    become one tensor and all zero biases another, so a pass folding a rescaling into one node's
    parameter would change every other node using it. Copies are named `<name>.<consumer node>`
    and follow the original in the initializer list; a model that shares nothing is left as is.
    """
    params = {t for s in info.sites for t in (s.weight, s.bias) if t}
    params |= {t for g in info.ln_groups for t in (g.gamma, g.beta) if t}
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for x in dict.fromkeys(n.input):
            if x in params and x in inits:
                users.setdefault(x, []).append(n)
    names = set(inits) | {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    copies: dict[str, list[onnx.TensorProto]] = {}
    for x, nodes in users.items():
        for n in nodes[1:]:  # the first consumer keeps the original
            name, k = f"{x}.{n.name}", 1
            while name in names:
                name, k = f"{x}.{n.name}_{k}", k + 1
            names.add(name)
            t = onnx.TensorProto()
            t.CopyFrom(inits[x])
            t.name = name
            copies.setdefault(x, []).append(t)
            for i, y in enumerate(n.input):
                if y == x:
                    n.input[i] = name
    if copies:
        new = []
        for t in model.graph.initializer:
            new += [t] + copies.get(t.name, [])
        del model.graph.initializer[:]
        model.graph.initializer.extend(new)
    return sum(map(len, copies.values()))


class Canonicalize(Pass):
    name = "canonicalize"

    def __call__(self, ctx: Context) -> PassResult:
        ctx.model, done = canonicalize_model(ctx.model)
        ctx.invalidate()
        n_copies = unshare_parameters(ctx.model, ctx.info)
        if n_copies:
            ctx.invalidate()
            done.append(f"{n_copies} copies of shared parameters")
        info = ctx.info
        check_skip(info, ctx.config.skip_sites)
        return PassResult(ctx, bool(done), f"{info.family}: {len(info.sites)} sites ({info.summary()})"
                          + (f"; {', '.join(done)}" if done else ""), sites=len(info.sites))
