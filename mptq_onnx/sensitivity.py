"""PMQ's global sensitivity: a score for every quantizer at every bit-width, from a fixed number of
forward passes that does not grow with the number of quantizers (Xiao et al., 2023, section 1 of
our issue; the paper's own metric is not public, this is ours).

A *quantizer* is what a bit allocator moves: one site's weights, or all of one site's inputs.
The probe graph is the float model with every quantizer's error at the probe width (the lowest
candidate) behind a switch: x + s·(Q(x) − x) for inputs, W + s·ΔW for weights. A fixed budget of
rows (images x masks per image) is spread over the quantizers in rotation, one quantizer on per
row, so each meets about rows / quantizers images whatever the model's size. A row's KL to float
is divided by its image's mean over all its rows (images differ in how much any error moves
them), and a quantizer's cost c_k at the probe width is the mean over its rows (the least-squares
fit of KL ≈ Σ m_k c_k when one switch is on per row). Rows run from the cut before their
quantizer's block, on float activations computed once (simulate.TailScorer), so a row costs
about half a network pass on average.

Other widths come from the data, not from evaluations: each quantizer's error energy on its
calibration sample at the probe width and the next candidate gives a per-bit ratio r, and
Ω_k(b) = c_k · r^(b_probe − b) (the quadratic model: a small perturbation's KL grows with its
noise power). Switching several quantizers on per row (a random design) ranked them worse: see
docs/journal.md, session 14.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx

from .calibrate import session
from .emit import Editor
from .quantizers import Quantizer, fake_quant

RATIO_RANGE = (2.0, 16.0)  # per-bit growth of a quantizer's cost (as Greedy MP's extrapolation)
MAX_CUTS = 16


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
    runs: int                        # onnxruntime runs (one per quantizer, from its block's cut)
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

    def __init__(self, model: onnx.ModelProto, threads: int | None = None, providers=None):
        self.model = model
        self.threads, self.providers = threads, providers
        self.sess = session(model, threads, providers=providers)
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
    # at most 16 cuts: each is a session to build (65 ms each on swin_tiny_tin, 34 cuts), while
    # starting at the previous cut instead runs only a little more of the network
    tails = TailScorer(_ProbeSim(probe, ctx.config.threads, ctx.config.providers), images, {}, max_cuts=MAX_CUTS)
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
    # one quantizer per row: the least-squares cost of each is the mean of its rows (never below 0)
    k_of = masks.argmax(axis=1)
    cnt = np.bincount(k_of, minlength=len(items))
    c = np.maximum(np.bincount(k_of, y, minlength=len(items)) / np.maximum(cnt, 1), 0.0)
    pred = c[k_of]
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
