"""Quantizer math in plain numpy: the reference every ONNX emission is tested against.

Rounding is round-half-to-even (np.rint), as in ONNX QuantizeLinear and Round.
Kinds:
- ``uniform``: q = clip(rint(x / s) + z, qmin, qmax); x̂ = (q - z) s. Per-tensor or per-channel.
- ``region``: split at zero, separate scales for the negative and the positive region (OPT-m's
  post-GELU quantizer). Codes -n_neg..qpos, n_neg + qpos + 1 = 2^bits.
- ``log2``: x̂ = s 2^(-q/k), q = clip(rint(-k log2(x / s)), 0, 2^bits - 2), the top code meaning 0;
  k = `steps_per_octave` (1: log2; 2: log√2, RepQ-ViT's post-Softmax quantizer, which spends its
  codes on the large probabilities where a 2x step is coarsest; 4: log⁴√2, for 6 bits and up).
- ``sulq``: shift-uniform-log2 (I&S-ViT's post-Softmax quantizer): l = log2(x + η) is quantized
  uniformly (scale = the log-domain step, zero point, codes 0..2^bits - 1), and the dequantized
  exponent is rounded: x̂ = 2^rint((q - z) s) - η. Every value is a power of two minus η.
"""
from __future__ import annotations

import dataclasses

import numpy as np

F32 = np.float32

try:  # the clip ufunc itself: np.clip's argument handling costs ~10 µs a call, and the searches
    from numpy._core.umath import clip as _clip  # make tens of thousands of calls per conversion
except ImportError:  # numpy < 2
    from numpy.core.umath import clip as _clip


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


@dataclasses.dataclass
class Quantizer:
    kind: str
    bits: int
    scale: np.ndarray                 # () or (C,) float32; region: the positive scale
    zero_point: np.ndarray            # same shape, int
    qmin: int
    qmax: int
    axis: int | None = None           # per-channel axis of the tensor it quantizes
    neg_scale: float = 0.0            # region only
    method: str = ""
    steps_per_octave: int = 1         # log2 only: 1 = base 2, 2 = base √2
    shift: float = 0.0                # sulq only: η, added before the log2 and taken off after

    def fake(self, x: np.ndarray) -> np.ndarray:
        return fake_quant(x, self)

    def describe(self) -> str:
        s = np.atleast_1d(self.scale)
        sc = f"{float(s[0]):.3g}" if s.size == 1 else f"[{float(s.min()):.3g}..{float(s.max()):.3g}]x{s.size}"
        extra = f" neg_s={self.neg_scale:.3g}" if self.kind == "region" else ""
        extra += f" η={self.shift:.3g}" if self.kind == "sulq" else ""
        zp = np.atleast_1d(self.zero_point)
        z = f" zp={int(zp[0])}" if zp.size == 1 and self.kind in ("uniform", "sulq") else ""
        kind = log_name(self.steps_per_octave) if self.kind == "log2" else self.kind
        return f"{kind}{self.bits} s={sc}{z}{extra}"

    def to_json(self) -> dict:
        d = {"kind": self.kind, "bits": self.bits, "qmin": self.qmin, "qmax": self.qmax, "method": self.method}
        s = np.atleast_1d(self.scale)
        if s.size == 1:
            d["scale"] = float(s[0])
            d["zero_point"] = int(np.atleast_1d(self.zero_point)[0])
        else:
            d["axis"] = self.axis
            d["scale_range"] = [float(s.min()), float(s.max())]
        if self.kind == "region":
            d["neg_scale"] = float(self.neg_scale)
        if self.kind == "log2":
            d["steps_per_octave"] = self.steps_per_octave
        if self.kind == "sulq":
            d["shift"] = float(self.shift)
        return d


def log_name(k: int) -> str:
    """log2, log√2, log⁴√2, ...: the base of a log quantizer with k codes per octave."""
    return {1: "log2", 2: "log√2", 3: "log³√2", 4: "log⁴√2"}.get(k, f"log2^(1/{k})")


def _bshape(q: Quantizer, x: np.ndarray):
    if q.axis is None or np.ndim(q.scale) == 0:
        return q.scale, q.zero_point
    shape = [1] * x.ndim
    shape[q.axis] = -1
    return q.scale.reshape(shape), q.zero_point.reshape(shape)


def fake_quant(x: np.ndarray, q: Quantizer) -> np.ndarray:
    """Quantize-dequantize in float32, as QuantizeLinear/DequantizeLinear compute it.

    In-place float32 arithmetic: the searches call this thousands of times per conversion.
    (q − z)·s of two float32 values rounds the same in float32 as in float64, so this equals the
    float64 formula cast to float32.
    """
    x = np.asarray(x, F32)
    if q.kind == "uniform":
        # (clip(rint(x/s) + z, qmin, qmax) - z)·s = clip(rint(x/s), qmin - z, qmax - z)·s, exactly:
        # every term is a small integer; np.clip is several times faster than maximum/minimum
        s, z = _bshape(q, x)
        s, z = np.asarray(s, F32), np.asarray(z, F32)
        y = x / s
        np.rint(y, out=y)
        _clip(y, F32(q.qmin) - z, F32(q.qmax) - z, out=y)
        y *= s
        return y
    if q.kind == "region":
        sn, sp = F32(q.neg_scale), np.asarray(q.scale, F32)
        neg = np.minimum(x, F32(0)) / sn
        np.rint(neg, out=neg)
        _clip(neg, F32(q.qmin), F32(0), out=neg)
        neg *= sn
        pos = np.maximum(x, F32(0)) / sp
        np.rint(pos, out=pos)
        _clip(pos, F32(0), F32(q.qmax), out=pos)
        pos *= sp
        pos += neg
        return pos
    if q.kind == "log2":
        k = q.steps_per_octave
        with np.errstate(divide="ignore"):
            e = np.clip(np.rint(-k * np.log2(np.maximum(x, 0) / q.scale)), 0, q.qmax)
        return np.where(e >= q.qmax, F32(0), q.scale * np.exp2(-e / k)).astype(F32)
    if q.kind == "sulq":
        s, z, eta = np.asarray(q.scale, F32), np.asarray(q.zero_point, F32), F32(q.shift)
        # log2 as the graph computes it (ONNX has no Log2): ln, then times 1/ln 2, in float32
        t = np.log(np.maximum(x + eta, F32(1e-30))) * F32(1.0 / np.log(2.0))
        t /= s
        np.rint(t, out=t)
        _clip(t, F32(q.qmin) - z, F32(q.qmax) - z, out=t)
        t *= s
        np.rint(t, out=t)
        return (np.exp2(t) - eta).astype(F32)
    raise ValueError(f"unknown quantizer kind {q.kind!r}")


def quantize_int(x: np.ndarray, q: Quantizer) -> np.ndarray:
    """Integer codes of a uniform quantizer (what a stored weight holds)."""
    s, z = _bshape(q, x)
    return np.clip(np.rint(x / s) + z, q.qmin, q.qmax).astype(np.int32)


# --- constructors -------------------------------------------------------------------------------

def uniform_from_range(lo: float, hi: float, bits: int, *, signed_zero: bool = False,
                       method: str = "minmax") -> Quantizer:
    """Asymmetric per-tensor quantizer covering [lo, hi] (which is widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = qrange(bits, signed_zero)
    scale = max((hi - lo) / (qmax - qmin), 1e-8)
    zp = min(max(round(qmin - lo / scale), qmin), qmax)  # Python floats: round() is half-to-even, as np.rint
    return Quantizer("uniform", bits, np.array(scale, F32), np.array(zp, np.int32), qmin, qmax, method=method)


def symmetric_per_channel(w: np.ndarray, axis: int, bits: int, absmax: np.ndarray | None = None,
                          method: str = "minmax") -> Quantizer:
    qmin, qmax = qrange(bits, True)
    if absmax is None:
        red = tuple(i for i in range(w.ndim) if i != axis)
        absmax = np.abs(w).max(axis=red)
    scale = np.maximum(absmax / qmax, 1e-8).astype(F32)
    return Quantizer("uniform", bits, scale, np.zeros(scale.shape, np.int32), qmin, qmax, axis=axis, method=method)


def region_quantizer(neg_min: float, pos_max: float, bits: int, neg_codes: int, method: str = "region") -> Quantizer:
    """Region-wise quantizer: `neg_codes` codes below zero over [neg_min, 0), the rest over [0, pos_max]."""
    qpos = (1 << bits) - 1 - neg_codes
    s_pos = max(pos_max / max(qpos, 1), 1e-8)
    s_neg = max(-min(neg_min, 0.0) / max(neg_codes, 1), 1e-8)
    return Quantizer("region", bits, np.array(s_pos, F32), np.array(0, np.int32), -neg_codes, qpos,
                     neg_scale=float(s_neg), method=method)


def log2_quantizer(max_val: float, bits: int, method: str = "log2", steps_per_octave: int = 1) -> Quantizer:
    return Quantizer("log2", bits, np.array(max(max_val, 1e-8), F32), np.array(0, np.int32), 0,
                     (1 << bits) - 1, method=method, steps_per_octave=steps_per_octave)


def sulq_quantizer(x_min: float, x_max: float, bits: int, eta: float, method: str = "sulq") -> Quantizer:
    """SULQ for values in [x_min, x_max] (x_min > -eta): uniform over [log2(x_min + η), log2(x_max + η)].

    2^bits codes, so a b-bit model stores b-bit values (I&S-ViT's reference code sets its range
    with 2^b - 1 steps but runs with 2^b steps and 2^b + 1 codes; we keep the former). The
    log-domain range is widened to contain 0, as every uniform quantizer here, so the zero point is
    a valid code (for post-Softmax values with η ≤ 1 it changes little: log2(max + η) is near 0).
    """
    lo = float(np.log2(max(x_min + eta, 1e-30)))
    hi = float(np.log2(max(x_max + eta, 1e-30)))
    u = uniform_from_range(lo, hi, bits)
    return Quantizer("sulq", bits, u.scale, u.zero_point, u.qmin, u.qmax, method=method, shift=float(eta))


# --- searches -----------------------------------------------------------------------------------

def _mse(a: np.ndarray, b: np.ndarray) -> float:
    d = (a - b).reshape(-1)
    return float(d @ d) / max(d.size, 1)


def search_uniform(x: np.ndarray, bits: int, err=None, *, lo: float | None = None, hi: float | None = None,
                   grid: int = 20, floor: float = 0.2, rounds: int = 2, method: str = "mse") -> Quantizer:
    """Per-tensor asymmetric clipping range [a·lo, b·hi] minimising `err(fake(x))` (default: MSE on x).

    Coordinate descent over the two clipping ratios; with `err` measuring a layer's output this is
    OPT-m's data-driven choice of the scaling factor.
    """
    return search_uniform_scored(x, bits, err, lo=lo, hi=hi, grid=grid, floor=floor, rounds=rounds,
                                 method=method)[1]


def search_uniform_scored(x: np.ndarray, bits: int, err=None, *, lo: float | None = None,
                          hi: float | None = None, grid: int = 20, floor: float = 0.2, rounds: int = 2,
                          method: str = "mse") -> tuple[float, Quantizer]:
    """`search_uniform`, returning (err of the choice, the quantizer)."""
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    err = err or (lambda xq: _mse(xq, x))
    ratios = np.linspace(1.0, floor, grid)
    a, b = 1.0, 1.0
    cache: dict[tuple[float, float], tuple[float, Quantizer]] = {}

    def score(ra, rb):
        key = (round(ra, 6), round(rb, 6))
        if key not in cache:
            q = uniform_from_range(lo * ra, hi * rb, bits, method=method)
            cache[key] = (err(fake_quant(x, q)), q)
        return cache[key]

    def near(r: float) -> list[float]:  # later rounds: two grid steps either side of the current ratio
        i = int(np.argmin(np.abs(ratios - r)))
        return ratios[max(i - 2, 0): i + 3].tolist()

    for k in range(rounds):  # Python floats: np.float64 keys and products are slower in this loop
        if hi > 0:
            b = min(ratios.tolist() if k == 0 else near(b), key=lambda r: score(a, r)[0])
        if lo < 0:
            a = min(ratios.tolist() if k == 0 else near(a), key=lambda r: score(r, b)[0])
    return score(a, b)


def uniform_per_channel(lo: np.ndarray, hi: np.ndarray, bits: int, axis: int = -1,
                        method: str = "minmax") -> Quantizer:
    """Asymmetric quantizer per channel of the last axis covering [lo_c, hi_c] (widened to 0):
    what `uniform_from_range` gives each channel, vectorised."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    qmin, qmax = qrange(bits, False)
    scale = np.maximum((hi - lo) / (qmax - qmin), 1e-8)
    zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax)
    return Quantizer("uniform", bits, scale.astype(F32), zp.astype(np.int32), qmin, qmax, axis=axis, method=method)


def search_per_channel(x: np.ndarray, bits: int, lo: np.ndarray, hi: np.ndarray,
                       ratios=(1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)) -> Quantizer:
    """Per-channel activation quantizer for rows `x` [n, C] (channels' full ranges `lo`, `hi`):
    each channel's range shrunk by the ratio of `ratios` with the smallest squared error of that
    channel (I&S-ViT searches percentiles per channel the same way, by MSE)."""
    x = np.asarray(x, F32)
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    best_err = np.full(x.shape[1], np.inf)
    best_lo, best_hi = lo64.copy(), hi64.copy()
    for r in ratios:
        q = uniform_per_channel(lo * r, hi * r, bits)  # in the input's dtype, as the search scores it
        d = fake_quant(x, q) - x
        e = np.einsum("nc,nc->c", d, d)
        better = e < best_err
        best_err[better] = e[better]
        best_lo[better], best_hi[better] = (lo64 * r)[better], (hi64 * r)[better]
    return uniform_per_channel(best_lo, best_hi, bits, method="mse-per-channel")


# η candidates of I&S-ViT's search for post-Softmax SULQ
SULQ_ETAS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)


def search_sulq_scored(x: np.ndarray, bits: int, err=None, *, lo: float | None = None,
                       hi: float | None = None, etas=SULQ_ETAS, method: str = "sulq") -> tuple[float, Quantizer]:
    """The η of `etas` whose SULQ over [lo, hi] (default: x's range) minimises `err(fake(x))`
    (default: MSE on x); returns (its err, the quantizer). Ties go to the earlier η."""
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    err = err or (lambda xq: _mse(xq, x))
    best = None
    for eta in etas:
        if lo + eta <= 0:  # log2 of a non-positive value: no range to quantize
            continue
        q = sulq_quantizer(lo, hi, bits, eta, method=method)
        e = err(fake_quant(x, q))
        if best is None or e < best[0]:
            best = (e, q)
    if best is None:
        raise ValueError(f"SULQ needs x + η > 0; min {lo} with η up to {max(etas)}")
    return best


def search_sulq(x: np.ndarray, bits: int, err=None, **kw) -> Quantizer:
    """`search_sulq_scored`'s quantizer."""
    return search_sulq_scored(x, bits, err, **kw)[1]


def search_weight(w: np.ndarray, out_axis: int, bits: int, hessian: np.ndarray | None = None,
                  rows: np.ndarray | None = None, grid: int = 12, refine: int = 2, floor: float = 0.3,
                  method: str = "mse") -> Quantizer:
    """Per-output-channel symmetric clipping, searched per channel: a grid of clipping ratios, then
    `refine` points on each side of every channel's best, a third of a grid step apart.

    The error of channel c is d_cᵀ H d_c, the squared error of that output channel on the
    calibration tokens (2-D weights only), with H = XᵀX given as `hessian` or as the rows X
    (cheaper when X has fewer rows than columns); with neither, it is the weight MSE.
    """
    red = tuple(i for i in range(w.ndim) if i != out_axis)
    absmax = np.abs(w).max(axis=red)

    def errors(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = symmetric_per_channel(w, out_axis, bits, absmax * r)
        d = fake_quant(w, q)
        d -= w
        if w.ndim == 2 and (hessian is not None or rows is not None):
            dm = d if out_axis == 1 else d.T           # [in, out]
            if rows is not None:
                xd = rows @ dm
                return np.einsum("no,no->o", xd, xd), q.scale
            return np.einsum("io,io->o", dm, hessian @ dm), q.scale
        return (d * d).sum(axis=red), q.scale

    best_err = np.full(absmax.shape, np.inf)
    best_r = np.ones(absmax.shape)
    best_scale = np.maximum(absmax / qrange(bits, True)[1], 1e-8).astype(F32)

    def consider(r: np.ndarray) -> None:
        nonlocal best_err, best_r, best_scale
        e, scale = errors(r)
        better = e < best_err
        best_err = np.where(better, e, best_err)
        best_r = np.where(better, r, best_r)
        best_scale = np.where(better, scale, best_scale).astype(F32)

    ratios = np.linspace(1.0, floor, grid)
    for r in ratios:
        consider(np.full(absmax.shape, r))
    step = (1.0 - floor) / max(grid - 1, 1)
    centre = best_r.copy()
    for k in range(1, refine + 1):
        for sign in (1, -1):
            consider(np.clip(centre + sign * k * step / (refine + 1), floor * 0.9, 1.0))
    qmin, qmax = qrange(bits, True)
    return Quantizer("uniform", bits, best_scale, np.zeros(best_scale.shape, np.int32), qmin, qmax,
                     axis=out_axis, method=method)


# --- error-compensating weight rounding (GPTQ, Frantar et al. 2022) ---------------------------------

# added to H's diagonal, times its mean: H of a few hundred tokens is singular (Swin's last stage),
# and in by-hand trials on tin_calib 0.1 gave a KL no worse than 0.01 on either model
GPTQ_DAMP = 0.1


CHOL_LEAF = 256  # blocks this small go to LAPACK whole


def _scratch(n: int) -> tuple[int, int]:
    """Elements of the two scratch buffers _chol_inv needs for an n x n block."""
    if n <= CHOL_LEAF:
        return 0, 0
    k, r = n // 2, n - n // 2
    a1, a2 = _scratch(k)
    b1, b2 = _scratch(r)
    return max(a1, r * k + b1), max(a2, r * r + b2, r * k)


def _chol_inv(a: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> None:
    """a (C-contiguous rows) becomes L⁻¹ in place, for a = LLᵀ; t1, t2: scratch (`_scratch`)."""
    n = len(a)
    if n <= CHOL_LEAF:
        a[:] = np.tril(np.linalg.inv(np.linalg.cholesky(a)))
        return
    k, r = n // 2, n - n // 2
    _chol_inv(a[:k, :k], t1, t2)
    m11 = a[:k, :k]
    l21 = t1[:r * k].reshape(r, k)
    np.matmul(a[k:, :k], m11.T, out=l21)               # A21 L11⁻ᵀ
    s = t2[:r * r].reshape(r, r)
    np.matmul(l21, l21.T, out=s)
    a[k:, k:] -= s                                      # the Schur complement: L22 L22ᵀ
    _chol_inv(a[k:, k:], t1[r * k:], t2[r * r:])       # l21 stays in t1[:r*k]
    p = t2[:r * k].reshape(r, k)
    np.matmul(a[k:, k:], l21, out=p)
    np.matmul(p, m11, out=a[k:, :k])
    np.negative(a[k:, :k], out=a[k:, :k])
    a[:k, k:] = 0.0


def chol_inv_lower(a: np.ndarray, overwrite_a: bool = False) -> np.ndarray:
    """L⁻¹ for A = LLᵀ (A symmetric positive definite, float64), by 2x2 blocks in place: the
    Cholesky factor and its inverse together, all but the smallest blocks in matrix products
    (about 4n³/3 flops at the BLAS rate). np.linalg.cholesky alone ran at a tenth of that rate,
    and fresh temporaries per block cost as much again in page faults (3072 inputs: 1.0 s -> 0.33 s).
    `overwrite_a`: work in `a` itself where it is a C-contiguous float64 array."""
    ok = overwrite_a and a.dtype == np.float64 and a.flags.c_contiguous
    out = a if ok else np.array(a, np.float64, order="C")
    n1, n2 = _scratch(len(out))
    _chol_inv(out, np.empty(n1), np.empty(n2))
    return out


def gptq_round(w_io: np.ndarray, q: Quantizer, h: np.ndarray, damp: float = GPTQ_DAMP,
               block: int = 128) -> np.ndarray:
    """Weights [in, out] rounded onto q's per-output-channel grid, compensating through H [in, in].

    Returns the dequantized weights (on the grid), float32. Inputs that are always zero are
    rounded plainly. Inputs are taken in order of decreasing H_ii: the costliest errors first,
    while the most channels are left to absorb them.
    """
    n_in, n_out = w_io.shape
    s = np.broadcast_to(np.asarray(q.scale, np.float32), (n_out,))
    z = np.broadcast_to(np.asarray(q.zero_point, np.float32), (n_out,))
    inv_s = (1.0 / s).astype(np.float32)
    lo, hi = np.float32(q.qmin), np.float32(q.qmax)
    has_z = bool(np.any(z))
    d = np.array(np.diag(h), np.float64)
    dead = d <= 0
    d[dead] = 1.0
    d += damp * float(np.mean(d))
    perm = np.argsort(-d, kind="stable")
    # GPTQ walks U, upper-triangular with UᵀU = H⁻¹ (row i carries input i's error to the inputs
    # after it). With J the order reversal and JHJ = LLᵀ, U = J L⁻¹ J: JHJ of the permuted,
    # damped H is made in one copy
    rp = perm[::-1]
    hr = np.asarray(h)[np.ix_(rp, rp)].astype(np.float64, copy=False)
    hr[np.diag_indices(n_in)] = d[rp]
    u = chol_inv_lower(hr, overwrite_a=True)[::-1, ::-1].astype(np.float32)
    del hr
    w = np.array(w_io[perm], np.float32)                 # [in, out], rows contiguous
    out = np.empty_like(w)
    # scratch for the two updates' products: fresh temporaries of a MiB and more were each a new
    # mapping, faulted in page by page (see calibrate.map_large_allocations)
    tmp = np.empty((block, n_out), np.float32)
    far = np.empty((max(n_in - block, 0), n_out), np.float32)
    err = np.empty((block, n_out), np.float32)
    for a in range(0, n_in, block):
        b = min(a + block, n_in)
        wb = w[a:b]                                      # a view: updated in place
        for i in range(b - a):
            row = wb[i]
            qr = np.rint(row * inv_s)
            if has_z:
                qr += z
            _clip(qr, lo, hi, out=qr)
            if has_z:
                qr -= z
            qr *= s
            out[a + i] = qr
            e = err[i]
            np.subtract(row, qr, out=e)
            e /= u[a + i, a + i]
            m = b - a - i - 1
            if m:
                np.multiply(u[a + i, a + i + 1:b, None], e, out=tmp[:m])
                wb[i + 1:] -= tmp[:m]
        if b < n_in:
            np.matmul(u[a:b, b:].T, err[:b - a], out=far[:n_in - b])
            w[b:] -= far[:n_in - b]
    res = np.empty_like(out)
    res[perm] = out
    return res
