"""Block-wise reconstruction (I&S-ViT's last stage, after BRECQ) of an ONNX model in torch.

The float graph is cut into segments, one per transformer block (sites sharing `Site.block`) and
one per remaining site (patch embedding, head, Swin's patch merging: layer by layer). Each cut
lies where the fewest activations are alive, which is the residual stream between blocks. For
each segment in order, its weights and biases are trained (Adam, cosine lr, quantizers frozen,
straight-through rounding) so that the fake-quantized segment, fed the quantized model's
activations (earlier segments already reconstructed), matches the float segment fed the float
model's activations (MSE, or each element weighted by the model's sensitivity to it:
`ReconSettings.loss`, `fisher_weights`, `tail_kl_weights`). The float model is `teacher` where passes before changed the weights
(GPTQ rounding, I&S-ViT's first stage), else the graph itself with its quantizers off.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..analyze import GraphInfo
from ..modelio import Spill
from ..plan import RECON_LOSSES, RECON_ROUNDINGS
from .fakequant import LEARNABLE, LearnedRounding, LearnedScale, fake_quantizer
from .interp import Segment


@dataclasses.dataclass
class ReconSettings:
    iters: int = 100
    batch: int = 32
    lr: float = 4e-5
    device: str = "cpu"
    seed: int = 0
    eval_batch: int = 64
    progress: bool = False
    # torch threads while training (None: torch's default, one per core). On an idle 2-core
    # machine two threads ran a deit_tiny_tin block's step 1.9x faster than one (tools/recon_profile.py);
    # on a loaded one (load ~36) one thread was faster (1.2 s against 9.5 s wall)
    threads: int | None = None
    # I&S-ViT's first stage: train every planned weight in float, through no weight quantizer
    # even where the plan has one (activations quantized only)
    float_weights: bool = False
    quant_inputs: bool = True
    drop: float = 0.0         # QDrop probability while training (see _ActHook)
    # train the scales of uniform and region activation quantizers too (LSQ), at this learning
    # rate on their logarithms; 0 keeps them frozen
    scale_lr: float = 0.0
    # "mse": every element of a block's output counts alike; "fisher": each weighted by the squared
    # gradient of the float model's cross-entropy (on its own top-1) at that element, per image
    # (BRECQ's diagonal Fisher); "fisher_mean": that square averaged over the images (one weight
    # per token and channel); "fisher_abs": the gradient's magnitude averaged over the images (a
    # diagonal weighting after FIMA-Q); "fisher_kl": the magnitude of the gradient of KL(float || model)
    # with the block quantized and the rest float (FIMA-Q's source), averaged likewise; each scaled
    # to mean 1 per tensor. "fisher_dplr": fisher_abs's weights in FIMA-Q's diagonal plus rank-one
    # loss (one gradient row: its low-rank part at k = 1)
    loss: str = "mse"
    # also train the affine parameters (γ, β) of the LayerNorms feeding quantized inputs: an
    # unconstrained form of OmniQuant's learnable equivalent transformation, after SQ-b's fixed one
    train_norms: bool = False
    # "ste": the weights train through straight-through rounding; "learned": they stay and each
    # one's rounding down or up trains instead (AdaRound; Adam at `round_lr`, regularizer weight
    # `round_reg` per element of one image's block output, as BRECQ's per-image summed loss)
    rounding: str = "ste"
    round_lr: float = 1e-2
    round_reg: float = 0.01


@dataclasses.dataclass
class SegmentSpec:
    name: str
    start: int                # node index range [start, end)
    end: int
    inputs: list[str]
    outputs: list[str]
    sites: list[str]


def _const_tensors(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers, Constant outputs and what nodes compute from constants alone (folded here)."""
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(onnx.helper.get_attribute_value(n.attribute[0]))
        elif n.input and all((not x) or x in consts for x in n.input) and n.op_type not in ("Shape", "Size"):
            try:
                seg = Segment([n], consts, [], list(n.output))
                with torch.no_grad():
                    outs = seg()
                consts.update({o: v.numpy() for o, v in zip(n.output, outs)})
            except NotImplementedError:
                pass
    return consts


def plan_segments(model: onnx.ModelProto, info: GraphInfo, site_names: list[str],
                  consts: dict[str, np.ndarray]) -> list[SegmentSpec]:
    g = model.graph
    nodes = list(g.node)
    pos = {n.name: i for i, n in enumerate(nodes)}
    groups: dict[str, list] = {}
    for s in info.sites:
        if s.name not in site_names:
            continue
        idx = [pos[s.node]] + ([pos[s.bias_node]] if s.bias_node else [])
        key = s.block or s.name
        lo, hi, names = groups.get(key, (len(nodes), -1, []))
        groups[key] = (min(lo, min(idx)), max(hi, max(idx)), names + [s.name])
    order = sorted(groups.items(), key=lambda kv: kv[1][0])
    for (a, (_, hi_a, _)), (b, (lo_b, _, _)) in zip(order, order[1:]):
        if lo_b <= hi_a:
            raise NotImplementedError(f"blocks {a} and {b} interleave in the graph")
    # live[i]: activations produced before node i and used at or after it
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            if x and x not in consts:
                last_use[x] = i
    for o in g.output:
        last_use[o.name] = len(nodes)
    live_at: list[list[str]] = []
    live = [i.name for i in g.input if i.name not in consts]
    for i, n in enumerate(nodes):
        live = [t for t in live if last_use.get(t, -1) >= i]
        live_at.append(list(live))
        live += [o for o in n.output if o and o not in consts]
    live_at.append([t for t in live if last_use.get(t, -1) >= len(nodes)])
    bounds = [0]
    for (_, (_, hi_a, _)), (_, (lo_b, _, _)) in zip(order, order[1:]):
        cands = range(hi_a + 1, lo_b + 1)  # a cut before node p
        bounds.append(min(cands, key=lambda p: (len(live_at[p]), p)))
    bounds.append(len(nodes))
    return [SegmentSpec(key, bounds[k], bounds[k + 1], live_at[bounds[k]], live_at[bounds[k + 1]], names)
            for k, (key, (_, _, names)) in enumerate(order)]


class _ActHook:
    """An activation's fake quantizer; with `drop` > 0 (QDrop, Wei et al. 2022, while training
    only) each element keeps its float value with that probability, so the weights do not fit one
    quantization noise pattern of the few calibration images."""

    def __init__(self, fq):
        self.fq = fq
        self.drop = 0.0
        self.gen: torch.Generator | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fq(x)
        if self.drop <= 0.0:
            return y
        keep = torch.rand(x.shape, generator=self.gen, device=x.device) < self.drop
        return torch.where(keep, x, y)


def build_segments(model: onnx.ModelProto, info: GraphInfo, plan: dict, device: str = "cpu",
                   float_weights: bool = False, specs: list[SegmentSpec] | None = None,
                   learn_scales: bool = False, train_norms: bool = False, learn_rounding: bool = False,
                   float_model: onnx.ModelProto | None = None):
    """(spec, torch Segment) per segment, with the plan's fake quantizers hooked in and the
    weights and biases of its weight-quantized sites as parameters (`float_weights`: of every planned
    site with a weight, trained in float: the plan's weight quantizers are left out). `specs`: cut at these segments' boundaries (by tensor name).
    `learn_scales`: uniform and region activation quantizers are LearnedScale objects; each
    segment's `learned` lists (site name, input index, LearnedScale) for its nodes. `train_norms`:
    the γ and β of LayerNorms feeding a quantized input are parameters too (canonicalize gave
    every LayerNorm its own). `learn_rounding`: uniform weight quantizers are LearnedRounding
    objects and their weights are not parameters (biases are); each segment's `rounders` lists
    (weight name, LearnedRounding), each starting from the weight's rounding in `model` with the
    other choice on the side of its weight in `float_model` (by name; see LearnedRounding)."""
    consts = _const_tensors(model.graph)
    floats = {t.name: t for t in float_model.graph.initializer} if float_model is not None and learn_rounding else {}
    nodes = list(model.graph.node)
    by_name = {n.name: n for n in nodes}
    hooks: dict[tuple[str, int], object] = {}
    learned: dict[str, list] = {}
    rounders: dict[str, list] = {}
    trainable: list[str] = []
    for name, p in plan.items():
        s = p.site
        node = by_name[s.node]
        for i, (a, q) in enumerate(zip(s.inputs, p.acts)):
            if q is not None:
                if learn_scales and q.kind in LEARNABLE:
                    fq = LearnedScale(q, device)
                    learned.setdefault(s.node, []).append((name, i, fq))
                else:
                    fq = fake_quantizer(q, device)
                hooks[(s.node, list(node.input).index(a.tensor))] = _ActHook(fq)
        rounded = learn_rounding and p.weight is not None and not float_weights and p.weight.kind == "uniform"
        if rounded:
            wf = floats.get(s.weight)
            wf = numpy_helper.to_array(wf) if wf is not None and tuple(wf.dims) == consts[s.weight].shape else None
            fq = LearnedRounding(p.weight, consts[s.weight], device, w_float=wf)
            rounders.setdefault(s.node, []).append((s.weight, fq))
            hooks[(s.node, list(node.input).index(s.weight))] = fq
        elif p.weight is not None and not float_weights:
            hooks[(s.node, list(node.input).index(s.weight))] = fake_quantizer(p.weight, device)
        if p.weight is not None or (float_weights and s.weight):
            trainable += ([] if rounded else [s.weight]) + ([s.bias] if s.bias else [])
        if train_norms:
            for a, q in zip(s.inputs, p.acts):
                if q is not None and a.kind == "post_ln" and a.ln in by_name:
                    trainable += [t for t in by_name[a.ln].input[1:3] if t in consts and t not in trainable]
    specs = match_segments(plan_segments(model, info, list(plan), consts), specs)
    out = []
    for sp in specs:
        for t in sp.inputs + sp.outputs:
            if t in consts:
                raise NotImplementedError(f"segment boundary {t} is a constant")
        seg = Segment(nodes[sp.start:sp.end], consts, sp.inputs, sp.outputs, tuple(trainable), hooks)
        seg.to(device)
        seg.consts = {k: v.to(device) for k, v in seg.consts.items()}
        seg.learned = [x for n in nodes[sp.start:sp.end] for x in learned.get(n.name, [])]
        seg.rounders = [x for n in nodes[sp.start:sp.end] for x in rounders.get(n.name, [])]
        out.append((sp, seg))
    return out


def match_segments(mine: list[SegmentSpec], ref: list[SegmentSpec] | None) -> list[SegmentSpec]:
    """`mine`, checked to cut the graph where `ref` (another model's segments) does."""
    if ref is not None and [(m.name, m.inputs, m.outputs) for m in mine] != [(r.name, r.inputs, r.outputs) for r in ref]:
        raise NotImplementedError("the float reference model's blocks do not line up with the quantized model's")
    return mine


def _batched(seg: Segment, xs: list[torch.Tensor], quant: bool, bs: int, device: str) -> list[torch.Tensor]:
    n = len(xs[0])
    outs: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, n, bs):
            y = seg(*[x[i:i + bs].to(device) for x in xs], quant=quant)
            outs.append([t.cpu() for t in y])
    return [torch.cat([o[k] for o in outs]) for k in range(len(seg.outputs))]


def _run_chain(pairs, x0: torch.Tensor, quant: bool, bs: int, device: str) -> dict[str, torch.Tensor]:
    """The (spec, segment) pairs in order from the images `x0`: the last segment's outputs by name."""
    env = {pairs[0][0].inputs[0]: x0}
    for sp, seg in pairs:
        env = dict(zip(sp.outputs, _batched(seg, [env[t] for t in sp.inputs], quant, bs, device)))
    return env


@contextlib.contextmanager
def _frozen(params):
    """`params` without gradients for the duration (gradients of the activations only), then as they were."""
    trained = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, trained):
            p.requires_grad_(r)


def _terms(ys, ts, ws):
    """FIMA-Q's two terms for weights w: the diagonal one, mean(w·Δ²), and the rank-one one, the
    mean over images of (mean of w·|Δ| over the image's elements)²."""
    d = r = 0.0
    for y, t, w in zip(ys, ts, ws):
        e = y - t
        d = d + torch.mean(w * e * e)
        a = (w * e.abs()).reshape(len(e), -1).mean(1)
        r = r + torch.mean(a * a)
    return d, r


def _mse(ys, ts, ws=None, term_scales=None) -> torch.Tensor:
    if ws is None:
        return sum(torch.mean((y - t) ** 2) for y, t in zip(ys, ts))
    if term_scales is not None:  # fisher_dplr: each term over its value before training, as FIMA-Q
        d, r = _terms(ys, ts, ws)
        return d / term_scales[0] + r / term_scales[1]
    return sum(torch.mean(w * (y - t) ** 2) for y, t, w in zip(ys, ts, ws))


def _loss(seg, xs, ts, bs, device, ws=None, term_scales=None) -> float:
    ys = _batched(seg, xs, True, bs, device)
    return float(_mse(ys, ts, ws, term_scales))


class FisherWeights:
    """Gradient-based weights per segment-boundary tensor. Per image ("fisher") they are kept in a
    temporary file until asked for: every block output of the training images at once would be
    4 GB on vit_base (512 images). The averaged modes keep one running sum per tensor."""

    def __init__(self, mode: str = "fisher"):
        if mode not in ("fisher", "fisher_mean", "fisher_abs"):
            raise ValueError(f"unknown Fisher weighting {mode!r}")
        self.mode = mode
        self._file = tempfile.TemporaryFile(prefix="mptq_fisher_") if mode == "fisher" else None
        self._spill = Spill(self._file) if self._file else None
        self._images: dict[str, int] = {}  # the averaged modes: images summed, to divide by
        self._chunks: dict[str, int] = {}  # "fisher": arrays spilled, one per add()
        self._sums: dict[str, np.ndarray] = {}
        self._none: set[str] = set()

    def add(self, name: str, g: torch.Tensor | None) -> None:
        if g is None:  # the output does not depend on it (in this batch): weight 1, as unknown
            self._none.add(name)
            return
        a = g.detach().abs().cpu().numpy()
        if self._spill is not None:
            k = self._chunks.get(name, 0)
            self._spill.put(f"{name}\0{k}", a)
            self._chunks[name] = k + 1
            return
        self._images[name] = self._images.get(name, 0) + len(a)
        a = (a.astype(np.float64) ** (2 if self.mode == "fisher_mean" else 1)).sum(0, keepdims=True)
        self._sums[name] = a if name not in self._sums else self._sums[name] + a

    def __contains__(self, name: str) -> bool:
        return (name in self._images or name in self._chunks) and name not in self._none

    def get(self, name: str) -> torch.Tensor:
        """The weights of `name`, scaled to mean 1: per image ("fisher"), or one batch row shared
        by every image (the averaged modes)."""
        if self._spill is None:
            w = torch.from_numpy((self._sums[name] / self._images[name]).astype(np.float32))
        else:
            g = torch.from_numpy(np.concatenate([self._spill.array(f"{name}\0{k}") for k in range(self._chunks[name])]))
            w = g * g
        return w / w.mean().clamp_min(1e-30)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def fisher_weights(specs: list[SegmentSpec], t_segs: list, x0: torch.Tensor, out_name: str,
                   bs: int, device: str, mode: str = "fisher") -> FisherWeights:
    """Per segment-boundary tensor, the gradient of the float model's cross-entropy against its own
    top-1 class, per image and element (`FisherWeights.get` makes weights of it as `mode` says and
    scales each tensor to mean 1; a
    tensor without gradient, e.g. an unused output, is left out and weighs 1). Where the output
    does not depend on an element (patch tokens after the last block of a class-token ViT), its
    weight is 0."""
    names = list(dict.fromkeys(t for sp in specs for t in sp.outputs if t != out_name))
    out = FisherWeights(mode)
    with _frozen([p for ts in t_segs for p in ts.parameters()]):
        for i in range(0, len(x0), bs):
            env = {specs[0].inputs[0]: x0[i:i + bs].to(device).requires_grad_(True)}  # the graph to differentiate
            keep: dict[str, torch.Tensor] = {}
            for sp, ts in zip(specs, t_segs):
                ys = ts(*[env[t] for t in sp.inputs], quant=False)
                env = dict(zip(sp.outputs, ys))
                for t, y in env.items():
                    if t in names and t not in keep and y.is_floating_point():
                        keep[t] = y
            logits = env[out_name]
            loss = torch.nn.functional.cross_entropy(logits.reshape(len(logits), -1),
                                                     logits.detach().reshape(len(logits), -1).argmax(1),
                                                     reduction="sum")  # per image: no 1/batch
            ts_ = [t for t in names if t in keep and keep[t].requires_grad]
            grads = dict(zip(ts_, torch.autograd.grad(loss, [keep[t] for t in ts_], allow_unused=True)))
            for t in names:
                g = grads.get(t)
                out.add(t, g)
    return out


def tail_kl_weights(seg: Segment, qx: list[torch.Tensor], outputs: list[str], tail: list, ref: torch.Tensor,
                    out_name: str, bs: int, device: str) -> list[torch.Tensor]:
    """FIMA-Q's source of the Fisher: the gradient of KL(float model || this model) at the block's
    outputs, where the block is quantized (fed `qx`, the quantized model's activations) and the
    `tail` after it runs in float; its magnitude averaged over the images, one weight per token
    and channel, scaled to mean 1 per tensor (the logits and outputs without gradient weigh 1)."""
    sums: dict[str, torch.Tensor] = {}
    with _frozen([p for _, ts in tail for p in ts.parameters()]):
        for i in range(0, len(qx[0]), bs):
            with torch.no_grad():
                ys = seg(*[x[i:i + bs].to(device) for x in qx], quant=True)
            env = {t: y.requires_grad_(True) for t, y in zip(outputs, ys) if y.is_floating_point()}
            leaves = dict(env)
            for sp, ts in tail:
                env = dict(zip(sp.outputs, ts(*[env[t] for t in sp.inputs], quant=False)))
            z = env[out_name].reshape(len(ys[0]), -1)
            p_ref = torch.softmax(ref[i:i + bs].to(device).reshape(len(z), -1), 1)
            loss = torch.nn.functional.kl_div(torch.log_softmax(z, 1), p_ref, reduction="sum")
            names = [t for t in leaves if t != out_name]
            if not names:
                break
            grads = torch.autograd.grad(loss, [leaves[t] for t in names], allow_unused=True)
            for t, g in zip(names, grads):
                if g is not None:
                    a = g.detach().abs().sum(0, keepdim=True).cpu()
                    sums[t] = a if t not in sums else sums[t] + a
    return [sums[t] / sums[t].mean().clamp_min(1e-30) if t in sums else torch.ones(()) for t in outputs]


def reconstruct(model: onnx.ModelProto, info: GraphInfo, plan: dict, images: np.ndarray,
                settings: ReconSettings, teacher: onnx.ModelProto | None = None,
                teacher_info: GraphInfo | None = None) -> tuple[dict[str, np.ndarray], list[dict], dict[tuple[str, int], object]]:
    """Trained weights and biases by initializer name, a report row per segment, and the
    activation quantizers whose scales trained, by (site name, input index). `teacher`: the float
    model whose block outputs are the targets (default: `model` without quantizers)."""
    before = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _reconstruct(model, info, plan, images, settings, teacher, teacher_info)
    finally:
        torch.set_num_threads(before)  # torch's setting is process-wide: leave it as it was


def _trained(seg: Segment) -> tuple[list, list, list]:
    """What training changes in a segment, by learning rate: its weights and biases (and norms),
    its learned activation scales, its AdaRound V."""
    return (list(seg.parameters()), [v for _, _, fq in seg.learned for v in fq.params],
            [r.param for _, r in seg.rounders])


def train_segment(seg: Segment, qx: list[torch.Tensor], targets: list[torch.Tensor], ws, settings: ReconSettings,
                  k: int, label: str = "", term_scales=None) -> None:
    """`settings.iters` Adam steps on `seg`'s weights (and learned scales) towards `targets` from
    the inputs `qx`, batches drawn from the seed and the segment's index `k`."""
    from tqdm import tqdm

    from ..calibrate import heap_allocations
    dev, n = settings.device, len(qx[0])
    acts = [h for h in seg.hooks.values() if isinstance(h, _ActHook)]
    gen = torch.Generator(device=dev).manual_seed(settings.seed * 1000 + k)
    for h in acts:
        h.drop, h.gen = settings.drop, gen
    groups = [{"params": ps, "lr": lr} for ps, lr in zip(_trained(seg), (settings.lr, settings.scale_lr, settings.round_lr))
              if ps]
    rounders = [r for _, r in seg.rounders]
    if rounders:
        # BRECQ sums the error over one image's block output; ours is a mean over its elements
        per_image = sum(int(np.prod(t.shape[1:])) for t in targets)
        lam = settings.round_reg / max(per_image, 1)
        for r in rounders:
            r.hard = False
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.iters)
    rng = np.random.default_rng([settings.seed, k])
    bs = min(settings.batch, n)
    bar = tqdm(range(settings.iters), desc=f"recon {label}", leave=False, disable=not settings.progress)
    warm = int(0.2 * settings.iters)  # AdaRound: no regularizer for the first 20%, then β from 20 to 2
    with heap_allocations():  # the steps' temporaries only: the activations kept stay mapped apart
        for it in bar:
            idx = torch.from_numpy(np.sort(rng.choice(n, bs, replace=False)))
            ys = seg(*[x[idx].to(dev) for x in qx], quant=True)
            loss = _mse(ys, [t[idx].to(dev) for t in targets],
                        None if ws is None else [w[idx].to(dev) if w.ndim and len(w) == n > 1 else w.to(dev) for w in ws],
                        term_scales)
            if rounders and it >= warm:
                beta = 2.0 + 18.0 * (1.0 - (it - warm) / max(settings.iters - warm, 1))
                loss = loss + lam * sum(r.regularizer(beta) for r in rounders)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4g}")
    bar.close()
    for h in acts:
        h.drop, h.gen = 0.0, None
    for r in rounders:
        r.hard = True


def _reconstruct(model, info, plan, images, settings, teacher, teacher_info=None):
    from tqdm import tqdm

    from ..analyze import analyze

    dev = settings.device
    if settings.rounding not in RECON_ROUNDINGS:
        raise ValueError(f"unknown weight rounding {settings.rounding!r}")
    segs = build_segments(model, info, plan, dev, settings.float_weights, learn_scales=settings.scale_lr > 0,
                          train_norms=settings.train_norms, learn_rounding=settings.rounding == "learned",
                          float_model=teacher)
    if teacher is not None:
        t_info = teacher_info or analyze(teacher)
        t_plan = {n: dataclasses.replace(p, site=t_info.site(n), weight=None, acts=[]) for n, p in plan.items()}
        t_segs = [t for _, t in build_segments(teacher, t_info, t_plan, dev, specs=[sp for sp, _ in segs])]
    else:
        t_segs = [seg for _, seg in segs]
    x0 = torch.from_numpy(np.ascontiguousarray(images[:len(images)], np.float32))  # streamed images: one read
    out_name = model.graph.output[0].name
    fisher = None
    ref = None
    if settings.loss == "fisher_kl":  # the float logits, for each block's tail gradient
        ref = _run_chain([(sp, ts) for (sp, _), ts in zip(segs, t_segs)], x0, False, settings.eval_batch, dev)[out_name]
    elif settings.loss in RECON_LOSSES and settings.loss != "mse":
        fisher = fisher_weights([sp for sp, _ in segs], t_segs, x0, out_name, settings.eval_batch, dev,
                                "fisher_abs" if settings.loss == "fisher_dplr" else settings.loss)
    elif settings.loss != "mse":
        raise ValueError(f"unknown reconstruction loss {settings.loss!r}")
    f_env = {segs[0][0].inputs[0]: x0}
    q_env = dict(f_env)
    n = len(x0)
    new: dict[str, np.ndarray] = {}
    new_acts: dict[tuple[str, int], object] = {}
    rows = []
    for k, ((sp, seg), t_seg) in enumerate(zip(segs, t_segs)):
        t0 = time.perf_counter()
        fx = [f_env[t] for t in sp.inputs]
        qx = [q_env[t] for t in sp.inputs] if settings.quant_inputs else fx
        for t in fx:
            if not t.is_floating_point() or len(t) != n:
                raise NotImplementedError(f"segment {sp.name}: input {t} is not a batch of activations")
        targets = _batched(t_seg, fx, False, settings.eval_batch, dev)
        # the logits (the last segment's output) and tensors without a gradient weigh 1
        ws = None if fisher is None else [fisher.get(t) if t in fisher else torch.ones(()) for t in sp.outputs]
        if ref is not None and k + 1 < len(segs):
            ws = tail_kl_weights(seg, qx, sp.outputs, [(s, t) for (s, _), t in zip(segs[k + 1:], t_segs[k + 1:])],
                                 ref, out_name, settings.eval_batch, dev)
        row = {"segment": sp.name, "sites": len(sp.sites), "params": len(seg.param_names), "images": n}
        if (seg.param_names or seg.learned or seg.rounders) and settings.iters > 0:
            ys0 = _batched(seg, qx, True, settings.eval_batch, dev)
            term_scales = None
            if settings.loss == "fisher_dplr" and ws is not None:
                term_scales = tuple(max(float(v), 1e-30) for v in _terms(ys0, targets, ws))
            before = float(_mse(ys0, targets, ws, term_scales))
            del ys0
            trained = [p for ps in _trained(seg) for p in ps]
            start = [p.detach().clone() for p in trained]
            train_segment(seg, qx, targets, ws, settings, k, sp.name, term_scales)
            after = _loss(seg, qx, targets, settings.eval_batch, dev, ws, term_scales)
            row.update(loss_before=before, loss_after=after)
            if not after < before:  # training made this block worse: keep its weights as they were
                with torch.no_grad():
                    for p, p0 in zip(trained, start):
                        p.copy_(p0)
                row.update(kept=False, loss_after=before)
            else:
                for name, p in zip(seg.param_names, seg.weights):
                    new[name] = p.detach().cpu().numpy().astype(np.float32)
                for site, i, fq in seg.learned:
                    new_acts[(site, i)] = fq.quantizer()
                for name, r in seg.rounders:
                    new[name] = r.weight()
            if seg.learned:
                row["scales"] = len(seg.learned)
        qy = _batched(seg, qx, True, settings.eval_batch, dev) if settings.quant_inputs else targets
        for env, ys in ((f_env, targets), (q_env, qy)):
            for t in [t for t in env if t not in sp.outputs]:
                del env[t]
            env.update(zip(sp.outputs, ys))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if settings.progress and "loss_after" in row:
            tqdm.write(f"recon {sp.name}: loss {row['loss_before']:.4g} -> {row['loss_after']:.4g} "
                       f"({row['seconds']:.1f}s)")
    if fisher is not None:
        fisher.close()
    return new, rows, new_acts


def run_segments(model: onnx.ModelProto, info: GraphInfo, plan: dict, images: np.ndarray,
                 quant: bool = True) -> np.ndarray:
    """The whole model through the torch segments (fake-quantized if `quant`): its output."""
    segs = build_segments(model, info, plan)
    x0 = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    return _run_chain(segs, x0, quant, 64, "cpu")[model.graph.output[0].name].numpy()
