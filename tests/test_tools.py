"""The lab scripts in tools/ (baselines, paired test, fidelity hold-out, trials): what they compute."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from mptq_onnx.evaluator import evaluate
from test_evaluate import ds12, tiny_classifier  # noqa: F401, F811  (ds12: a fixture)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- onnxruntime baseline tool

def _ort_baseline():
    spec = importlib.util.spec_from_file_location("ort_baseline_under_test", REPO / "tools" / "ort_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ort_quantize_static_then_evaluate(ds12, tmp_path):
    root, w = ds12
    tool = _ort_baseline()
    onnx.save(tiny_classifier(w), tmp_path / "f.onnx")
    calib = np.random.default_rng(0).normal(size=(20, 3, 8, 8)).astype(np.float32)
    secs = tool.ort_quantize_static(tmp_path / "f.onnx", calib, tmp_path / "q8.onnx", 8, 8, "MinMax")
    assert secs > 0
    q = onnx.load(tmp_path / "q8.onnx")
    ops = [n.op_type for n in q.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert any(p.key == "mptq.preprocess" for p in q.metadata_props)
    f = evaluate(tmp_path / "f.onnx", root, progress=False)
    r = evaluate(tmp_path / "q8.onnx", root, progress=False)
    assert r.images == f.images and abs(r.top1 - f.top1) <= 0.1
    with pytest.raises(tool.UnsupportedBits, match="6-bit"):
        tool.ort_quantize_static(tmp_path / "f.onnx", calib, tmp_path / "q6.onnx", 6, 6, "MinMax")
    assert tool.parse_bits("8") == (8, 8) and tool.parse_bits("W4A8") == (4, 8)


# ---------------------------------------------------------------- paired comparison tool

def test_paired_comparison_counts_and_sign_test(tmp_path):
    spec = importlib.util.spec_from_file_location("paired_under_test", REPO / "tools" / "paired.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1, 1, 0] * 10, bool)
    b = a.copy()
    b[:6] = ~b[:6]  # 4 right only with a (indices 0, 1, 2, 5), 2 right only with b (3, 4)
    r = mod.compare(a, b)
    assert (r["only_ref"], r["only_vs"]) == (4, 2) and r["diff"] == pytest.approx(-0.02)
    assert r["ci95"][0] < -0.02 < r["ci95"][1] < 0.03
    assert r["p"] == pytest.approx(2 * 22 / 64)  # two-sided: 2 P(k <= 2 of 6)
    assert mod.sign_test_p(0, 10) == pytest.approx(2 / 1024) and mod.sign_test_p(5, 10) == 1.0
    assert mod.sign_test_p(600, 2000) < 1e-60 and mod.sign_test_p(1000, 2000) == 1.0  # past 2.0 ** 1023
    row = lambda c, h: {"config": c, "images": h.size, "val": "v", "limit": None,  # noqa: E731
                        "hits": np.packbits(h).tobytes().hex()}
    f = tmp_path / "r.json"
    f.write_text(json.dumps([row("float", a), row("q", b)]))
    np.testing.assert_array_equal(mod.hits(row("q", b)), b)
    assert mod.main([str(f), "--ref", "float", "--vs", "q"]) == 0
    again = tmp_path / "again.json"  # the same config run again elsewhere: --vs-from
    again.write_text(json.dumps([row("float", b)]))
    assert mod.main([str(f), "--ref", "float", "--vs", "float", "--vs-from", str(again)]) == 0


def test_sweep_table_applies_the_rule_to_the_last_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("sweep_under_test", REPO / "tools" / "recon_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = lambda c, s, v, kl: json.dumps({"card": c, "spec": s, "variant": v, "kl": kl})  # noqa: E731
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join([row("m", "s3", "mse", 0.9), row("m", "s3", "mse", 0.2),  # the later row counts
                            row("m", "s3", "new", 0.1), row("m", "s4", "mse", 0.1), row("m", "s4", "new", 0.2),
                            row("m", "other", "new", 9.0)]))
    out = mod.table([str(f)], ["s3", "s4"], ["mse", "new"])
    assert "| m | `s3` | 0.2000 | 0.1000 (x0.500) |" in out and "other" not in out
    assert "in 1 of 2, geometric mean of ratios 1.0000" in out  # sqrt(0.5 * 2)
    with pytest.raises(SystemExit):
        mod.table([str(f)], ["s3"], ["mse", "absent"])


# ---------------------------------------------------------------- fidelity tool

def test_fidelity_holdout_leaves_out_every_calibration_image():
    spec = importlib.util.spec_from_file_location("fidelity_under_test", REPO / "tools" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from mptq_onnx.data import spread_indices
    keep = mod.holdout_indices(1010, {128, 256, 384})
    for n in (128, 256, 384):
        assert not set(keep) & set(spread_indices(1010, n))
    assert len(keep) == 1010 - len(set(spread_indices(1010, 128)) | set(spread_indices(1010, 256))
                                   | set(spread_indices(1010, 384)))
    assert keep == sorted(keep) and len(keep) > 400
    assert mod.holdout_indices(10, {10}) == []


# ---------------------------------------------------------------- trials tool

def test_trials_patch_and_restore(monkeypatch):
    from types import SimpleNamespace

    from mptq_onnx.passes import attn_smooth, sqb
    for mod, attr in ((sqb, "ROWS"), (sqb, "search_smoothing"), (attn_smooth, "search_smoothing"),
                      (sqb, "smoothing_scale")):
        monkeypatch.setattr(mod, attr, getattr(mod, attr))  # restored after the test
    spec = importlib.util.spec_from_file_location("trials_under_test", REPO / "tools" / "trials.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    orig = sqb.search_smoothing
    mod.apply("mptq_onnx.passes.sqb.ROWS=2048")
    assert sqb.ROWS == 2048
    for bad in ("nope", "mptq_onnx.passes.sqb.NO_SUCH=1"):
        with pytest.raises(SystemExit):
            mod.apply(bad)
    rng = np.random.default_rng(0)
    xs = (rng.standard_normal((512, 16)) * rng.uniform(0.1, 3, 16) + rng.uniform(-2, 2, 16)).astype(np.float32)
    xs[:4] *= 6  # skewed channel ranges: mean and mid-range differ
    st = SimpleNamespace(ch_mean=xs.mean(0), ch_min=xs.min(0), ch_max=xs.max(0))
    ws = [rng.standard_normal((16, 8)).astype(np.float32)]
    args = (st, xs, ws, (0.5, 0.8), ("mean", "midrange"), 4, 4, True)
    err0, base = orig(*args)
    mod.apply("shift-margin=0")  # no margin: the plain search's choice
    assert sqb.search_smoothing(*args)[1][3] == base[3] and attn_smooth.search_smoothing is sqb.search_smoothing
    mod.apply("shift-margin=1")  # the mid-range can never be 100% better: the mean whenever it beats no rescaling
    e, best = sqb.search_smoothing(*args)
    assert e == err0 and best[3] in ("mean", "none")
    mod.apply("shift-only")
    assert np.all(sqb.smoothing_scale(np.ones(3), np.ones(3), -1) == 1)
