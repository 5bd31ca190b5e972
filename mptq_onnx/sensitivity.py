"""PMQ's global sensitivity: a score for every quantizer at every bit-width, from a fixed number of
forward passes that does not grow with the number of quantizers (Xiao et al., 2023, section 1 of
our issue; the paper's own metric is not public, this is ours).

A *quantizer* is what a bit allocator moves: one site's weights, or all of one site's inputs.
The probe graph adds to every quantizer k its fake-quantization error at the probe width through
a per-image switch: x + m[n, k] (Q(x) - x) for activations, y + m[n, k] (x ΔW) for weights. One
batch row is one (image, random switch vector) pair, so a single onnxruntime run scores as many
random mixed configurations as it has rows. The KL to float of each row is regressed on its
switches (non-negative least squares):

    KL(row) ≈ Σ_k m[row, k] c_k

c_k is the cost of quantizer k at the probe width while about `density` of the others are on
too: a global measure, taken inside mixed configurations like those the allocator builds, not
from the all-high one. Other widths follow each quantizer's own quantization error on its
calibration sample (the quadratic model: a small perturbation's KL grows with its noise power):
Ω_k(b) = c_k · r_k^(b_probe - b), r_k the per-bit ratio of E_k at the probe width and the next
candidate. E is computed from the data, so it needs no evaluation.

Cost: rows / batch onnxruntime runs of the whole network (`rows` = images x masks per image),
against Greedy MP's two tail runs per quantizer.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .calibrate import session
from .emit import Editor
from .quantizers import Quantizer, fake_quant

RATIO_RANGE = (2.0, 16.0)  # per-bit growth of a quantizer's cost (as Greedy MP's extrapolation)


@dataclasses.dataclass
class Item:
    """One quantizer an allocator sets: `key` = (site name, 'w' | 'a')."""
    key: tuple[str, str]
    site: object
    share: float                     # its weight in the average it belongs to (sums to 1 per type)


@dataclasses.dataclass
class Sensitivity:
    omega: dict[tuple[str, str], dict[int, float]]   # key -> {bits: Ω}
    probe_bits: int
    rows: int
    runs: int                        # onnxruntime runs of the whole network (batches)
    seconds: float
    fit_r2: float                    # how much of the rows' KL variance the additive model explains


def _error_energy(x: np.ndarray | None, q: Quantizer | None) -> float | None:
    if x is None or q is None:
        return None
    x = np.asarray(x, np.float32)
    return float(np.square(fake_quant(x, q).astype(np.float64) - x).mean())


def noise_energy(ctx, prov, site, typ: str, bits: int) -> float | None:
    """Mean squared quantization error of a quantizer on its calibration data (None: no sample)."""
    if typ == "w":
        return _error_energy(ctx.weight(site.weight), prov.weight(site, bits))
    total, any_ = 0.0, False
    for a, q in zip(site.inputs, prov.acts(site, bits)):
        st = ctx.calib.stats.get(a.tensor)
        e = _error_energy(None if st is None else st.sample, q)
        if e is not None:
            total, any_ = total + e, True
    return total if any_ else None


def build_probe(model: onnx.ModelProto, items: list[Item], prov, probe_bits: int, weights) -> tuple[onnx.ModelProto, list[str]]:
    """The float model with every item's error at `probe_bits` behind a switch: one graph input
    per item, [1, 1], default 0 (off); returns the model and those inputs' names. An input is
    x + s·(Q(x) − x), a weight W + s·ΔW: a switched weight is computed once per run, not per
    image, and depends on no activation, so the cuts between blocks stay cuts (TailScorer).
    `weights(name)` reads an initializer."""
    ed = Editor(model, "sim")
    nodes = {n.name: n for n in model.graph.node}
    switches = [ed.const(f"pmq_on_{k}", np.zeros((1, 1), np.float32), feed=True) for k in range(len(items))]
    for k, it in enumerate(items):
        s = it.site
        base = f"pmq_{s.name}_{it.key[1]}".replace(".", "_").replace("@", "_")
        node = nodes[s.node]
        if it.key[1] == "a":
            for i, (a, q) in enumerate(zip(s.inputs, prov.acts(s, probe_bits))):
                if q is None:
                    continue
                y, _ = ed.act(s.node, a.tensor, q, f"{base}{i}")
                d = ed.node(s.node, "Sub", [y, a.tensor], f"{base}{i}_err")
                d = ed.node(s.node, "Mul", [d, switches[k]], f"{base}{i}_on")
                ed.use(s.node, list(node.input).index(a.tensor), ed.node(s.node, "Add", [a.tensor, d], f"{base}{i}_x"))
        else:
            w = weights(s.weight)
            dw = ed.const(base + "_dw", (fake_quant(w, prov.weight(s, probe_bits)) - w).astype(np.float32))
            d = ed.node(s.node, "Mul", [dw, switches[k]], base + "_on")
            ed.use(s.node, list(node.input).index(s.weight), ed.node(s.node, "Add", [s.weight, d], base + "_w"))
    return ed.finish(inplace=True), switches


class _ProbeSim:
    """What TailScorer needs of a simulator: the probe model and a whole-graph run."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.sess = session(model)
        self.in_name = model.graph.input[0].name
        self.out_name = model.graph.output[0].name

    def run(self, images: np.ndarray, feeds: dict, batch: int = 64) -> np.ndarray:
        return np.concatenate([self.sess.run([self.out_name], {self.in_name: images[i:i + batch], **feeds})[0]
                               for i in range(0, len(images), batch)])


def kl_rows(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) ‖ softmax(logits)) per row."""
    def logsoftmax(z):
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lp, lq = logsoftmax(ref_logits), logsoftmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def probe_masks(n_rows: int, k: int, seed: int) -> np.ndarray:
    """0/1 switches, one on in each row: every quantizer in turn, in a new random order each round
    (each meets about n_rows / k images)."""
    rng = np.random.default_rng([seed, 20230511])
    order = np.concatenate([rng.permutation(k) for _ in range(-(-n_rows // k))])[:n_rows]
    m = np.zeros((n_rows, k), np.float32)
    m[np.arange(n_rows), order] = 1.0
    return m


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls as _nnls
    return _nnls(a.astype(np.float64), b.astype(np.float64), maxiter=50 * a.shape[1])[0]


def global_sensitivity(ctx, prov, items: list[Item], cands: list[int], probe_bits: int, images: np.ndarray,
                       ref_logits: np.ndarray, masks_per_image: int, progress: bool = False,
                       per_image: bool = True) -> Sensitivity:
    """Ω for every item and candidate width (see the module doc)."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    model = onnx.ModelProto()
    model.CopyFrom(ctx.model)
    probe, switches = build_probe(model, items, prov, probe_bits, ctx.weight)
    n = len(images)
    rows = n * masks_per_image
    masks = probe_masks(rows, len(items), ctx.config.seed)
    img_of = np.arange(rows) % n
    kl = np.empty(rows)
    # one quantizer per row: nothing before its block is switched on, so its rows run from the
    # cut before that block on the float activations there, computed once (simulate.TailScorer)
    from .simulate import TailScorer
    tails = TailScorer(_ProbeSim(probe), images, {})
    on = np.ones((1, 1), np.float32)
    work = [(k, np.flatnonzero(masks[:, k]), {switches[k]: on}) for k in range(len(items))]
    work = [w for w in work if len(w[1])]
    tails.prepare([f for _, _, f in work])
    work.sort(key=lambda w: tails.start(w[2]))  # one tail session at a time
    for k, r, f in tqdm(work, desc="pmq: sensitivity", disable=not progress, leave=False):
        kl[r] = kl_rows(ref_logits[img_of[r]], tails.run_rows(f, img_of[r]))
    runs = len(work)
    del tails, probe
    y = kl
    if per_image:  # images differ in how much any error moves them: each image's rows to its mean
        img_mean = np.bincount(img_of, kl, minlength=n) / np.bincount(img_of, minlength=n)
        y = kl / np.maximum(img_mean[img_of], 1e-12) * kl.mean()
    c = nnls(masks, y)
    pred = masks @ c
    r2 = 1.0 - float(np.square(y - pred).sum() / max(np.square(y - y.mean()).sum(), 1e-30))
    # other widths: each quantizer's error energy at the probe width and the next candidate gives
    # its per-bit ratio r (kept within Greedy MP's [2, 16]), then Ω(b) = c · r^(probe - b). Two
    # widths of quantizers, as Greedy MP measures: OPT-m's searches at every width cost more than
    # the metric itself (35 s of 46 s on deit_tiny_tin)
    up = [b for b in sorted(cands) if b > probe_bits]
    omega: dict[tuple[str, str], dict[int, float]] = {}
    for it, ck in zip(items, c):
        r = 4.0
        if up:
            e0 = noise_energy(ctx, prov, it.site, it.key[1], probe_bits)
            e1 = noise_energy(ctx, prov, it.site, it.key[1], up[0])
            if e0 and e1:
                r = float(np.clip((e0 / e1) ** (1.0 / (up[0] - probe_bits)), *RATIO_RANGE))
        omega[it.key] = {b: float(ck) * r ** (probe_bits - b) for b in cands}
    return Sensitivity(omega, probe_bits, rows, runs, time.perf_counter() - t0, r2)
