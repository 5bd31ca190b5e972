"""Quantizer math (numpy) against onnxruntime running the emitted graph, in both emit modes."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mptq_onnx.emit import Editor
from mptq_onnx.passes.uniform import search_sample
from mptq_onnx.quantizers import (SULQ_ETAS, fake_quant, log2_quantizer, qrange, region_quantizer,
                                  search_sulq, search_sulq_scored, search_uniform, search_uniform_scored,
                                  search_weight, sulq_quantizer, symmetric_per_channel, uniform_from_range)


def _identity_model(shape):
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _run_act(q, x, mode):
    ed = Editor(_identity_model(list(x.shape)), mode)
    out, _ = ed.act("id", "x", q, "q", feed=(mode == "sim"))
    ed.use("id", 0, out)
    m = ed.finish()
    onnx.checker.check_model(m)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0], m


RNG = np.random.default_rng(0)
X = (RNG.standard_normal((64, 33)) * 3).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("mode", ["qdq", "sim"])
def test_uniform_matches_onnxruntime(bits, mode):
    q = uniform_from_range(-4.0, 7.0, bits)
    y, m = _run_act(q, X, mode)
    np.testing.assert_allclose(y, fake_quant(X, q), atol=1e-6)
    assert len(np.unique(y)) <= 2 ** bits
    if mode == "qdq":
        ops = [n.op_type for n in m.graph.node]
        assert "QuantizeLinear" in ops and ("Clip" in ops) == (bits not in (4, 8))


@pytest.mark.parametrize("mode", ["qdq", "sim"])
@pytest.mark.parametrize("bits,neg", [(4, 1), (4, 2), (6, 3), (8, 5)])
def test_region_matches_reference(mode, bits, neg):
    x = np.concatenate([RNG.uniform(-0.17, 0, 500), RNG.exponential(1.0, 1500)]).astype(np.float32).reshape(40, 50)
    q = region_quantizer(-0.17, 4.0, bits, neg)
    y, _ = _run_act(q, x, mode)
    # independent reference: code = clip(rint(x/s_region)); value = code * s_region
    ref = np.where(x < 0, np.clip(np.rint(x / q.neg_scale), -neg, 0) * q.neg_scale,
                   np.clip(np.rint(x / q.scale), 0, (1 << bits) - 1 - neg) * q.scale)
    np.testing.assert_allclose(y, ref, atol=1e-6)
    assert len(np.unique(y)) <= 2 ** bits


@pytest.mark.parametrize("mode", ["qdq", "sim"])
@pytest.mark.parametrize("k", [1, 2])
def test_log2_matches_reference(mode, k):
    x = RNG.dirichlet(np.ones(65), size=40).astype(np.float32)
    q = log2_quantizer(1.0, 4, steps_per_octave=k)
    y, _ = _run_act(q, x, mode)
    np.testing.assert_allclose(y, fake_quant(x, q), rtol=1e-6, atol=1e-9)
    # the levels: 0 and 2^(-c/k) for the 15 codes c = 0..14
    levels = np.array([0.0] + [2.0 ** (-c / k) for c in range(15)])
    assert np.abs(y.reshape(-1, 1) - levels).min(axis=1).max() < 1e-6
    # rounding in the log domain: each value goes to the nearest level in log_2 distance
    x1 = np.float32(2.0 ** (-3.2 / k))
    assert fake_quant(np.array([x1]), q)[0] == pytest.approx(2.0 ** (-3 / k), rel=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_weight_dequantize_matches(bits):
    w = RNG.standard_normal((24, 16)).astype(np.float32)
    q = symmetric_per_channel(w, 1, bits)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 24])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])],
                          [onnx.numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    ed = Editor(m, "qdq")
    out, _ = ed.weight("mm", "w", w, q, "qw")
    ed.use("mm", 1, out)
    m2 = ed.finish()
    stored = [t for t in m2.graph.initializer if t.name.startswith("qw_quantized")][0]
    assert stored.data_type == (TensorProto.INT4 if bits == 4 else TensorProto.INT8)
    assert "w" not in {t.name for t in m2.graph.initializer}  # float weight is gone
    if bits == 4:
        assert len(stored.raw_data) == w.size // 2  # packed two per byte
    # graph optimizations off: with a float input, onnxruntime may fuse DQ+MatMul into a kernel that
    # quantizes x dynamically, which is a different computation from the one tested here
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m2.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((5, 24)).astype(np.float32)
    np.testing.assert_allclose(s.run(None, {"x": x})[0], x @ fake_quant(w, q), rtol=1e-5, atol=1e-5)


def test_searches_beat_minmax():
    x = np.concatenate([RNG.standard_normal(20000), [40.0, -35.0]]).astype(np.float32)
    q_mm = uniform_from_range(x.min(), x.max(), 4)
    q_s = search_uniform(x, 4)
    err = lambda q: float(np.mean((fake_quant(x, q) - x) ** 2))  # noqa: E731
    assert err(q_s) < 0.5 * err(q_mm)
    w = RNG.standard_normal((64, 32)).astype(np.float32)
    w[0, 0] = 12.0
    qw, qm = search_weight(w, 1, 4), symmetric_per_channel(w, 1, 4)
    assert np.square(fake_quant(w, qw) - w).sum() < np.square(fake_quant(w, qm) - w).sum()
    assert qrange(4, True) == (-8, 7) and qrange(3, False) == (0, 7)


def test_search_uniform_scored_and_memoised_sample():
    """The score returned is the error of the quantizer returned; the memoised subsample draws the
    same values as a fresh generator with the seed, for any tensor of that size."""
    x = RNG.standard_normal(5000).astype(np.float32)
    err = lambda xq: float(np.abs(xq - x).max())  # noqa: E731
    e, q = search_uniform_scored(x, 4, err)
    assert e == err(fake_quant(x, q))
    assert search_uniform(x, 4, err) == q
    for t in (x, x * 3):
        idx = np.random.default_rng(7).choice(t.size, 1000, replace=False)
        np.testing.assert_array_equal(search_sample(t, 7, 1000), t[idx])
    # zero points from Python's round(): half to even, as np.rint and QuantizeLinear
    assert uniform_from_range(-2.5, 12.5, 4).zero_point == 2 and uniform_from_range(-3.5, 11.5, 4).zero_point == 4


def test_search_weight_rows_equal_hessian():
    """The output-error search gives the same clipping from the rows X as from H = XᵀX."""
    x = RNG.standard_normal((40, 96)).astype(np.float32)
    x[:, 3] *= 20  # an outlier channel makes the output error differ from the weight MSE
    w = RNG.standard_normal((96, 16)).astype(np.float32)
    q_h = search_weight(w, 1, 4, hessian=(x.T @ x).astype(np.float32))
    q_x = search_weight(w, 1, 4, rows=x)
    np.testing.assert_allclose(q_h.scale, q_x.scale, rtol=1e-6)
    err = lambda q: float(np.square(x @ (fake_quant(w, q) - w)).sum())  # noqa: E731
    assert err(q_x) <= err(search_weight(w, 1, 4)) + 1e-6  # output-aware beats weight-MSE on the output


def test_chol_inv_lower_is_the_inverse_cholesky_factor():
    from mptq_onnx.quantizers import chol_inv_lower
    rng = np.random.default_rng(0)
    for n in (5, 300, 700, 1001):  # from 300: the blocked in-place factor and inverse, odd splits too
        x = rng.standard_normal((n + 50, n))
        h = x.T @ x + np.eye(n)
        m = chol_inv_lower(h)
        np.testing.assert_array_equal(m, np.tril(m))
        np.testing.assert_allclose(m.T @ m, np.linalg.inv(h), rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(m, np.linalg.inv(np.linalg.cholesky(h)), rtol=1e-7, atol=1e-10)
        h0 = h.copy()
        assert chol_inv_lower(h) is not h and np.array_equal(h, h0)  # the input kept unless asked
        assert chol_inv_lower(h, overwrite_a=True) is h


def test_gptq_round_stays_on_grid_and_lowers_output_error():
    from mptq_onnx.quantizers import gptq_round
    rng = np.random.default_rng(0)
    n_in, n_out, rows = 96, 40, 2000
    mix = rng.standard_normal((n_in, n_in)) * 0.3 + np.eye(n_in)   # correlated inputs, as in a ViT
    x = (rng.standard_normal((rows, n_in)) @ mix).astype(np.float32)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    for bits in (3, 4, 6):
        q = symmetric_per_channel(w, 1, bits)
        nearest = fake_quant(w, q)
        new = gptq_round(w, q, (x.T @ x).astype(np.float64))
        np.testing.assert_array_equal(fake_quant(new, q), new)     # codes are rint(w/s): on the grid
        err = lambda v: float(np.square(x @ (v - w)).sum())  # noqa: E731
        assert err(new) < 0.8 * err(nearest), bits


# --- SULQ (shift-uniform-log2, I&S-ViT's post-Softmax quantizer) ---------------------------------

def _softmax_rows(n=40, k=65, temp=3.0, seed=1):
    z = np.random.default_rng(seed).standard_normal((n, k)) * temp
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("mode", ["qdq", "sim"])
@pytest.mark.parametrize("bits,eta", [(3, 0.01), (4, 0.001), (4, 0.1), (6, 0.02), (8, 0.5)])
def test_sulq_matches_onnxruntime(mode, bits, eta):
    x = _softmax_rows()
    q = sulq_quantizer(float(x.min()), float(x.max()), bits, eta)
    y, m = _run_act(q, x, mode)
    np.testing.assert_allclose(y, fake_quant(x, q), rtol=1e-6, atol=1e-7)
    # every value is a power of two minus η: an integer exponent
    e = np.log2(y.astype(np.float64) + np.float32(eta))
    np.testing.assert_allclose(e, np.rint(e), atol=1e-5)
    # independent float64 reference: uniform code of log2(x + η), then the rounded exponent
    lo, hi = np.log2(float(x.min()) + eta), np.log2(float(x.max()) + eta)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    step = (hi - lo) / (2 ** bits - 1)
    zp = np.clip(np.round(-lo / step), 0, 2 ** bits - 1)
    code = np.clip(np.rint(np.log2(x.astype(np.float64) + eta) / step) + zp, 0, 2 ** bits - 1)
    ref = 2.0 ** np.rint((code - zp) * step) - eta
    assert np.mean(np.isclose(y, ref, rtol=1e-5, atol=1e-7)) > 0.999  # float32 ties may differ
    if mode == "qdq":
        ops = {n.op_type for n in m.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Pow", "Round", "Log"} <= ops
        zp_t = [t for t in m.graph.initializer if t.name.startswith("q_log_zero_point")][0]
        assert zp_t.data_type == (TensorProto.UINT4 if bits == 4 else TensorProto.UINT8)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sulq_uses_2_to_the_bits_codes(bits):
    """2^b codes, not the 2^b + 1 of I&S-ViT's forward pass: a range spanning ~10 octaves at
    η = 0.001 gives exactly 2^b distinct values at 2 and 3 bits (2^b + 1 codes would give one
    more); at 4 bits the 16 codes round to the 11 exponents -10..0."""
    x = np.concatenate([_softmax_rows(temp=6.0).ravel(), [0.0, 1.0]]).astype(np.float32)
    q = sulq_quantizer(0.0, 1.0, bits, 0.001)
    assert (q.qmin, q.qmax) == (0, 2 ** bits - 1)
    y, _ = _run_act(q, x, "qdq")
    assert len(np.unique(y)) == min(2 ** bits, 11)
    assert y.max() == pytest.approx(1.0 - 0.001, abs=1e-7) and y.min() == pytest.approx(2.0 ** -10 - 0.001, abs=1e-7)


def test_sulq_search_picks_the_best_eta():
    # x = 2^k - 0.02 exactly: SULQ with η = 0.02 at 4 bits (log step < 1) reproduces it, no other η does
    eta0 = np.float32(0.02)
    k = np.random.default_rng(0).integers(-6, 1, 3000)
    x = (np.exp2(k).astype(np.float32) - eta0).astype(np.float32)
    e, q = search_sulq_scored(x, 4)
    assert q.shift == pytest.approx(0.02) and e == 0.0
    assert search_sulq(x, 4) == q
    # with an output error (x·V, as OPT-m scores attn·V), the choice is the brute-force argmin
    xs = _softmax_rows(n=64, k=32, seed=3)
    v = np.random.default_rng(4).standard_normal((32, 16)).astype(np.float32)
    err = lambda xq: float(np.square((xq - xs) @ v).sum())  # noqa: E731
    e, q = search_sulq_scored(xs, 3, err)
    brute = {eta: err(fake_quant(xs, sulq_quantizer(float(xs.min()), float(xs.max()), 3, eta)))
             for eta in SULQ_ETAS}
    assert e == min(brute.values()) and q.shift == min(brute, key=brute.get)
    assert e == err(fake_quant(xs, q))


def test_sulq_feeds_and_metadata():
    """Greedy MP's simulator can switch a slot between SULQ quantizers (and a uniform one) by feeds;
    an unused SULQ branch stays finite at 8 bits; inspect and describe show η."""
    from mptq_onnx.inspect import _fmt_q
    from mptq_onnx.simulate import Simulator, Slot
    x = _softmax_rows()
    q8 = uniform_from_range(0.0, 1.0, 8)
    sim = Simulator(_identity_model(list(x.shape)), [Slot("s", "a0", "id", "x", 0, ["uniform", "sulq"])],
                    {("s", "a0"): q8})
    np.testing.assert_allclose(sim.run(x, {}), fake_quant(x, q8), atol=1e-6)
    for bits, eta in ((3, 0.05), (8, 0.001)):
        q = sulq_quantizer(0.0, 1.0, bits, eta)
        np.testing.assert_allclose(sim.run(x, sim.feeds("s", "a0", q)), fake_quant(x, q), rtol=1e-6, atol=1e-7)
    q = sulq_quantizer(0.0, 1.0, 4, 0.03)
    assert "η=0.03" in q.describe() and q.describe().startswith("sulq4")
    assert _fmt_q(q.to_json()).startswith("sulq s=") and "η=0.03" in _fmt_q(q.to_json())
