"""PMQ (passes/pareto.py): the frontier's DP against brute force, the probe graph's per-image
switches against fake-quantized models, and the allocator end to end on the embedded model."""
import copy
import itertools
import json

import numpy as np
import onnx
import pytest

from mptq_onnx.calibrate import session
from mptq_onnx.cli import main
from mptq_onnx.data import load_calibration
from mptq_onnx.embedded import embedded_calib_dir, load_embedded_model
from mptq_onnx.emit import Editor
from mptq_onnx.errors import MptqError
from mptq_onnx.frontier import solve
from mptq_onnx.modelio import get_preprocess
from mptq_onnx.passes.base import PassManager
from mptq_onnx.passes.calibrate import Calibrate
from mptq_onnx.passes.canonicalize import Canonicalize
from mptq_onnx.passes.greedy_mp import UniformProvider
from mptq_onnx.passes.pareto import allocation_items
from mptq_onnx.passes.qdq import average_bits
from mptq_onnx.passes.uniform import UniformParams
from mptq_onnx.plan import Context, QuantConfig
from mptq_onnx.quantizers import fake_quant
from mptq_onnx.sensitivity import build_probe, probe_masks


def _run(m, xs):
    ss = session(m)
    return ss.run(None, {ss.get_inputs()[0].name: xs})[0]


def _brute(cands, shares, omega, target):
    best = np.inf
    for js in itertools.product(range(len(cands)), repeat=len(shares)):
        avg = sum(s * cands[j] for s, j in zip(shares, js))
        if avg <= target + 1e-9:
            best = min(best, sum(omega[k, j] for k, j in enumerate(js)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_frontier_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    cands = [3, 4, 6, 8]
    shares = rng.dirichlet(np.ones(5))
    # costs that fall with bits, like Ω, with random per-quantizer scales
    omega = rng.uniform(0.1, 10, (5, 1)) * 4.0 ** -np.array(cands)[None, :] * rng.uniform(0.5, 2, (5, 4))
    omega = np.minimum.accumulate(omega[:, ::-1], axis=1)[:, ::-1]  # non-increasing in bits
    f = solve(cands, shares, omega, grid=4096)
    assert np.all(np.diff(f.best) <= 1e-15)  # the frontier is monotone: more bits never cost Ω
    for t in np.linspace(3.0, 8.0, 21):
        idx = f.at(t)
        assert f.average(idx) <= t + 1e-9  # the budget holds exactly
        # optimal up to the grid's rounding (quantizers / 2 / grid bits of the average)
        slack = len(shares) / 2 / f.grid
        assert f.total(idx) <= _brute(cands, shares, omega, t - slack) + 1e-12
        assert f.total(idx) >= _brute(cands, shares, omega, t) - 1e-12


def test_probe_masks_rotate_single_quantizers():
    m = probe_masks(50, 7, seed=0)
    assert m.shape == (50, 7) and np.all(m.sum(1) == 1)
    counts = m.sum(0)
    assert counts.max() - counts.min() <= 1  # every quantizer in turn
    assert np.array_equal(m, probe_masks(50, 7, seed=0)) and not np.array_equal(m, probe_masks(50, 7, seed=1))


@pytest.fixture(scope="module")
def uniform_ctx():
    m = load_embedded_model()
    imgs = load_calibration(embedded_calib_dir(), get_preprocess(m), 8, progress=False)
    ctx = Context(m, QuantConfig(wbits=4, abits=4, calib_size=8, progress=False), imgs)
    PassManager([Canonicalize(), Calibrate(), UniformParams()], verbose=False)(ctx)
    return ctx


def test_probe_switches_each_image_alone(uniform_ctx):
    """The probe graph equals the float model with just the switched quantizer on:
    a weight (W replaced by its fake-quantized values) and an activation (fake-quant before the node)."""
    ctx = uniform_ctx
    prov = UniformProvider(ctx)
    items, _, _ = allocation_items(ctx)
    sites = {p.site.name: p.site for p in ctx.plan.values()}
    kw = next(i for i, it in enumerate(items) if it.key == ("blocks.3.mlp.fc1", "w"))
    ka = next(i for i, it in enumerate(items) if it.key == ("blocks.5.attn.q@k", "a"))
    probe, switches = build_probe(copy.deepcopy(ctx.model), items, prov, 3, ctx.weight)
    x = ctx.calib_images[:3]
    s = session(probe)
    on = np.ones((1, 1), np.float32)
    got = np.stack([s.run(None, {s.get_inputs()[0].name: x[i:i + 1], **f})[0][0]
                    for i, f in enumerate([{}, {switches[kw]: on}, {switches[ka]: on}])])
    run = _run
    ref_float = run(ctx.model, x)
    np.testing.assert_allclose(got[0], ref_float[0], rtol=1e-5, atol=1e-5)  # all off: float
    # a weight on: the float model with W replaced by Q(W) (x W + x ΔW against x (W + ΔW))
    site = sites["blocks.3.mlp.fc1"]
    mw = copy.deepcopy(ctx.model)
    w = ctx.weight(site.weight)
    for t in mw.graph.initializer:
        if t.name == site.weight:
            t.CopyFrom(onnx.numpy_helper.from_array(fake_quant(w, prov.weight(site, 3)), t.name))
    np.testing.assert_allclose(got[1], run(mw, x[1:2])[0], rtol=1e-4, atol=1e-4)
    assert np.abs(got[1] - ref_float[1]).max() > 1e-3  # and it did change the output
    # an activation on: both inputs of q@k fake-quantized before the node
    site = sites["blocks.5.attn.q@k"]
    ed = Editor(copy.deepcopy(ctx.model), "sim")
    node = next(n for n in ed.model.graph.node if n.name == site.node)
    for i, (a, q) in enumerate(zip(site.inputs, prov.acts(site, 3))):
        y, _ = ed.act(site.node, a.tensor, q, f"t{i}")
        ed.use(site.node, list(node.input).index(a.tensor), y)
    np.testing.assert_allclose(got[2], run(ed.finish(), x[2:3])[0], rtol=1e-4, atol=1e-4)
    assert np.abs(got[2] - ref_float[2]).max() > 1e-3


def test_pareto_allocator_end_to_end(embedded_onnx, tmp_path):
    out = tmp_path / "q.onnx"
    rc = main(["convert", str(embedded_onnx), "--recipe", "pmq", "--target-bits", "5", "--mp-images", "4",
               "--calib", str(embedded_calib_dir()), "--calib-size", "8", "-o", str(out), "-q"])
    assert rc == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["avg_w_bits"] <= 5.0 + 1e-3 and rep["avg_a_bits"] <= 5.0 + 1e-3  # the budget is met
    assert rep["avg_w_bits"] > 4.5 and rep["avg_a_bits"] > 4.5  # and used, not undershot
    front = rep["frontier"]
    chosen = [p for p in front if p.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["target"] == 5.0 and "kl" in chosen[0]
    om = [p["omega"] for p in front]
    assert all(a >= b - 1e-12 for a, b in zip(om, om[1:]))  # more bits, less Ω
    g = [p["gbops"] for p in front]
    assert all(a <= b + 1e-9 for a, b in zip(g, g[1:])) and rep["gbops"] == chosen[0]["gbops"]
    mp = rep["pareto_mp"]
    assert mp["candidates"] == [8, 6, 5, 4] and mp["rows"] == 4 * 32
    assert mp["runs"] < mp["rows"]  # rows run in groups, from their block's cut
    layers = {r["site"]: r for r in rep["layers"]}
    assert len({r["w_bits"] for r in layers.values() if r["w_bits"]}) >= 2  # mixed
    assert all("pareto-mp" in r["method"] for r in layers.values())


def test_pareto_mp_is_deterministic(uniform_ctx):
    from mptq_onnx.passes.pareto import ParetoMP
    outs = []
    for _ in range(2):
        ctx = copy.deepcopy(uniform_ctx)
        ctx.config = QuantConfig(wbits=4, abits=4, calib_size=8, progress=False, target_bits=4.5, mp_images=2,
                                 pmq_masks=8, pmq_measure_kl=False)
        ParetoMP()(ctx)
        outs.append({n: (p.w_bits, p.a_bits) for n, p in ctx.plan.items()})
        wb, ab = average_bits(ctx.plan, ctx.report["act_sizes"])
        assert wb <= 4.5 + 1e-6 and ab <= 4.5 + 1e-6
        assert ctx.report["pareto_mp"]["candidates"] == [8, 6, 5, 4, 3]  # 3 joins below a 5-bit target
    assert outs[0] == outs[1]


def test_pmq_recipe_needs_a_target():
    from mptq_onnx.convert import recipe_passes
    with pytest.raises(MptqError, match="target-bits"):
        recipe_passes(QuantConfig(recipe="pmq"))
    with pytest.raises(MptqError, match="allocator"):
        QuantConfig(allocator="random").validate()
    assert QuantConfig(target_bits=4).candidates() == (8, 6, 5, 4, 3)
    assert QuantConfig(target_bits=5).candidates() == (8, 6, 5, 4)
    assert QuantConfig(target_bits=4, mp_candidates=(8, 4)).candidates() == (8, 4)


def test_probe_rows_from_their_block_equal_whole_graph_rows(uniform_ctx):
    """The metric runs each quantizer's rows from the cut before its block (TailScorer.run_rows):
    the same logits as the whole probe graph, and later blocks start later."""
    from mptq_onnx.sensitivity import _ProbeSim
    from mptq_onnx.simulate import TailScorer
    ctx = uniform_ctx
    prov = UniformProvider(ctx)
    items, _, _ = allocation_items(ctx)
    probe, switches = build_probe(copy.deepcopy(ctx.model), items, prov, 4, ctx.weight)
    sim = _ProbeSim(probe)
    imgs = ctx.calib_images[:6]
    tails = TailScorer(sim, imgs, {})
    idx = np.array([4, 1, 2])
    starts = []
    for key in [("blocks.1.attn.qkv", "w"), ("blocks.7.mlp.fc2", "a"), ("head", "w")]:
        k = next(i for i, it in enumerate(items) if it.key == key)
        feeds = {switches[k]: np.ones((1, 1), np.float32)}
        starts.append(tails.start(feeds))
        np.testing.assert_allclose(tails.run_rows(feeds, idx), sim.run(imgs[idx], feeds), rtol=1e-5, atol=1e-5)
    assert 0 < starts[0] < starts[1] < starts[2]


def test_target_below_the_candidates_is_refused_before_any_work(embedded_onnx, tmp_path, capsys):
    rc = main(["convert", str(embedded_onnx), "--recipe", "mptq", "--target-bits", "2", "--calib",
               str(embedded_calib_dir()), "--calib-size", "4", "-o", str(tmp_path / "q.onnx"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot be met" in err and "from 3 to 8" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


def test_frontier_plot(embedded_onnx, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "q.onnx", tmp_path / "front.png"
    args = ["convert", str(embedded_onnx), "--recipe", "pmq", "--target-bits", "6", "--mp-candidates", "8", "6", "4",
            "--mp-images", "2", "--calib", str(embedded_calib_dir()), "--calib-size", "4", "-o", str(out),
            "--frontier-plot", str(png), "-q"]
    assert main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads(out.with_suffix(".report.json").read_text())
    measured = [p["target"] for p in rep["frontier"] if "kl" in p]
    # every whole bit the frontier reaches (from 4.25: the 8-bit image input), the chosen one too
    assert measured == [5.0, 6.0, 7.0, 8.0]
    # an existing plot is not overwritten without --force, and nothing else is written then
    out.unlink()
    assert main(args) == 2 and "exists" in capsys.readouterr().err and not out.exists()
    # the plot belongs to the pareto allocator
    assert main(["convert", str(embedded_onnx), "--recipe", "mptq", "--target-bits", "5", "--allocator", "greedy",
                 "--calib", str(embedded_calib_dir()), "--frontier-plot", str(tmp_path / "x.png")]) == 2


def test_patchwise_subgraph_equals_numpy():
    """The patch-wise attention·V operands equal a numpy reference on random attention."""
    from mptq_onnx.passes.patchwise import emit_patchwise
    from mptq_onnx.plan import PatchSpec
    from mptq_onnx.quantizers import log2_quantizer, uniform_from_range
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    b, h, t, d = 3, 2, 9, 4
    logits = rng.standard_normal((b, h, t, t)).astype(np.float32) * 2
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    v = rng.standard_normal((b, h, t, d)).astype(np.float32)
    hi = [log2_quantizer(1.0, 4), uniform_from_range(-2.5, 2.5, 5)]  # not INT4: opset 17 has none
    lo = [uniform_from_range(0.0, 1.0, 2), uniform_from_range(-2.5, 2.5, 2)]
    for ver, score in ((17, "mass"), (21, "mass"), (21, "cls")):
        spec = PatchSpec(4, t, 2, lo, score)
        g = helper.make_graph([helper.make_node("MatMul", ["attn", "v"], ["y"], name="av")], "g",
                              [helper.make_tensor_value_info("attn", TensorProto.FLOAT, [None, h, t, t]),
                               helper.make_tensor_value_info("v", TensorProto.FLOAT, [None, h, t, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, h, t, d])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", ver)])
        ed = Editor(m, "qdq")
        a2, v2 = emit_patchwise(ed, "av", "attn", "v", hi, spec, "p", ver)
        ed.use("av", 0, a2)
        ed.use("av", 1, v2)
        out = ed.finish()
        onnx.checker.check_model(out)
        got = session(out).run(None, {"attn": attn, "v": v})[0]
        mass = attn.mean(axis=(1, 2)) if score == "mass" else attn[:, :, 0, :].mean(axis=1)  # [b, t]
        low = mass <= np.sort(mass, axis=1)[:, 3:4]                      # the 4 smallest
        assert np.all(low.sum(1) == 4)
        aq = np.where(low[:, None, None, :], fake_quant(attn, lo[0]), fake_quant(attn, hi[0]))
        vq = np.where(low[:, None, :, None], fake_quant(v, lo[1]), fake_quant(v, hi[1]))
        np.testing.assert_allclose(got, aq @ vq, rtol=1e-5, atol=1e-6)


def test_patchwise_end_to_end(embedded_onnx, tmp_path):
    out = tmp_path / "q.onnx"
    rc = main(["convert", str(embedded_onnx), "--recipe", "uniform", "--wbits", "4", "--abits", "4", "--patchwise",
               "--calib", str(embedded_calib_dir()), "--calib-size", "8", "-o", str(out), "-q"])
    assert rc == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    pw = rep["patchwise"]
    assert pw["sites"] == 12 and pw["low_bits"] == 2
    # attention·V at half 4-bit, half 2-bit tokens: (16 + 0.5·16 + 0.5·4) / 32 of the attention BOPs
    assert 0.18 < pw["attention_gbops_saved"] < 0.20
    av = [r for r in rep["layers"] if r["role"] == "av"]
    assert all(r["patch"]["low_tokens"] == 32 and r["patch"]["tokens"] == 65 for r in av)
    m = onnx.load(out)
    node = next(n for n in m.graph.node if n.name.endswith("attn_v") or any(p.key == "mptq.patchwise" for p in n.metadata_props))
    assert any(p.key == "mptq.patchwise" for p in node.metadata_props)
    assert sum(n.op_type == "TopK" for n in m.graph.node) == 12


@pytest.mark.parametrize("drop", [100.0, 0.0])
def test_max_drop_bisects_the_frontier(embedded_onnx, tmp_path, drop):
    from mptq_onnx.embedded import embedded_val_dir
    out = tmp_path / "q.onnx"
    rc = main(["convert", str(embedded_onnx), "--recipe", "pmq", "--max-drop", str(drop), "--val",
               str(embedded_val_dir()), "--val-size", "48", "--mp-images", "2", "--calib", str(embedded_calib_dir()),
               "--calib-size", "8", "-o", str(out), "-q"])
    assert rc == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    md = rep["max_drop"]
    tried = {p["target"]: p["drop_points"] for p in md["tried"]}
    assert md["images"] == 48 and md["target"] == rep["pareto_mp"]["target"] and len(tried) <= 6
    if drop == 100.0:
        # anything passes: the lowest point of the frontier (3.25: the 8-bit image input keeps the
        # activations' average above 3)
        assert md["target"] == 3.25 and md["met"]
    else:  # every tried point below the chosen one failed; the chosen one passed (or nothing did)
        assert all(d > 0 for t, d in tried.items() if t < md["target"])
        assert (tried[md["target"]] <= 0) == md["met"]
    assert rep["avg_w_bits"] <= md["target"] + 1e-3 and rep["avg_a_bits"] <= md["target"] + 1e-3


def test_omega_from_an_earlier_report_reads_the_frontier_again(embedded_onnx, tmp_path, capsys):
    """--omega-from: a second target from the same Ω, no new measurement, the point the first
    run's frontier showed for it."""
    common = ["--recipe", "pmq", "--mp-images", "2", "--calib", str(embedded_calib_dir()), "--calib-size", "8", "-q"]
    first = tmp_path / "a.onnx"
    assert main(["convert", str(embedded_onnx), "--target-bits", "5", "-o", str(first), *common]) == 0
    rep_a = json.loads(first.with_suffix(".report.json").read_text())
    second = tmp_path / "b.onnx"
    assert main(["convert", str(embedded_onnx), "--target-bits", "6.5", "--omega-from",
                 str(first.with_suffix(".report.json")), "-o", str(second), *common]) == 0
    rep_b = json.loads(second.with_suffix(".report.json").read_text())
    mp = rep_b["pareto_mp"]
    assert mp["runs"] == 0 and mp["rows"] == 0 and mp["metric_seconds"] < 1.0 and mp["omega"] == rep_a["pareto_mp"]["omega"]
    then = next(p for p in rep_a["frontier"] if p["target"] == 6.5)
    assert (rep_b["avg_w_bits"], rep_b["avg_a_bits"]) == (round(then["avg_w_bits"], 3), round(then["avg_a_bits"], 3))
    # another model's (or recipe's) report is refused
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pareto_mp": {"omega": {"x:w": {"4": 1.0}}}}))
    assert main(["convert", str(embedded_onnx), "--target-bits", "5", "--omega-from", str(bad),
                 "-o", str(tmp_path / "c.onnx"), *common]) == 2
    assert "not this model's" in capsys.readouterr().err
