"""Passes on the embedded deit_tiny_tin (no torch needed): analysis, SQ-b folding, OPT-m, Greedy MP."""
import copy

import numpy as np
import onnx
import pytest

from mptq_onnx.analyze import analyze
from mptq_onnx.calibrate import session
from mptq_onnx.errors import MptqError
from mptq_onnx.passes.attn_smooth import AttnSmooth
from mptq_onnx.passes.calibrate import Calibrate
from mptq_onnx.passes.canonicalize import Canonicalize
from mptq_onnx.passes.greedy_mp import GreedyMP, UniformProvider, build_simulator, cost_table
from mptq_onnx.passes.optm import OptM, SiteOptimizer
from mptq_onnx.passes.qdq import average_bits, write_plan
from mptq_onnx.passes.rounding import GPTQRounding
from mptq_onnx.quantizers import SULQ_ETAS, fake_quant, sulq_quantizer
from mptq_onnx.passes.sqb import SmoothQuantBias, _quick_act, group_error
from mptq_onnx.passes.uniform import UniformParams
from mptq_onnx.plan import Context, QuantConfig
from mptq_onnx.simulate import TailScorer, kl_divergence


def _run(m, x):
    s = session(m)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _ctx(model, calib, **kw):
    ctx = Context(model, QuantConfig(progress=False, **kw), calib)
    Canonicalize()(ctx)
    Calibrate()(ctx)
    return ctx


# Config fields that Canonicalize or Calibrate read: a shared calibration is only valid without them.
_CALIB_FIELDS = {"row_budget", "full_images", "batch_size", "seed", "calib_batch_mb", "full_sample_mb",
                 "skip_sites"}


@pytest.fixture(scope="module")
def calibrated(model, calib):
    """Canonicalize + Calibrate on the 32 images, once: neither reads the bit-widths (_CALIB_FIELDS)."""
    return _ctx(model, calib)


def _copy(ctx, **kw):
    """A private copy of a shared context, with the config the test asks for (the images are shared:
    no pass writes them)."""
    assert not _CALIB_FIELDS & set(kw), "this config changes the calibration: use _ctx"
    new = copy.deepcopy(ctx, {id(ctx.calib_images): ctx.calib_images})
    new.config = QuantConfig(progress=False, **kw)
    return new


@pytest.fixture(scope="module")
def optm_w4a4(calibrated):
    ctx = _copy(calibrated, wbits=4, abits=4)
    OptM()(ctx)
    return ctx


@pytest.fixture(scope="module")
def optm_w8a8(calibrated):
    ctx = _copy(calibrated, wbits=8, abits=8)
    OptM()(ctx)
    return ctx


@pytest.fixture(scope="module")
def sqb_w4a4(calibrated):
    """SQ-b at W4A4, with the float logits on 8 images and every LayerNorm γ from before it."""
    ctx = _copy(calibrated, wbits=4, abits=4)
    imgs = ctx.calib_images[:8]
    before = _run(ctx.model, imgs)
    gamma_before = {g.gamma: ctx.weight(g.gamma).copy() for g in ctx.info.ln_groups}
    res = SmoothQuantBias()(ctx)
    return ctx, res, before, gamma_before


def test_analysis_finds_vit_roles(model):
    info = analyze(model)
    roles = {}
    for s in info.sites:
        roles[s.role] = roles.get(s.role, 0) + 1
    assert roles == {"patch_embed": 1, "qkv": 12, "qk": 12, "av": 12, "proj": 12, "fc1": 12, "fc2": 12, "head": 1}
    assert info.site("blocks.3.mlp.fc2").inputs[0].kind == "post_gelu"
    assert info.site("blocks.3.attn.attn@v").inputs[0].kind == "post_softmax"
    assert info.site("blocks.3.attn.qkv").inputs[0].kind == "post_ln"
    # every qkv/fc1 hangs off its own LayerNorm, the head off the final norm
    grouped = {n for g in info.ln_groups for n in g.sites}
    assert {s.name for s in info.by_role("qkv", "fc1", "head")} <= grouped


def test_non_vit_graph_is_rejected():
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    with pytest.raises(MptqError, match="not a ViT"):
        analyze(helper.make_model(g))


def test_sqb_folding_keeps_float_model(sqb_w4a4, calib):
    ctx, res, before, gamma_before = sqb_w4a4
    assert res.modified and ctx.report["sqb_groups"] == 25
    after = _run(ctx.model, calib[:8])
    rel = np.abs(after - before).max() / np.abs(before).max()
    assert rel < 1e-4, rel
    assert any(not np.allclose(ctx.weight(k), v) for k, v in gamma_before.items())
    # the post-LN input of qkv is now roughly centred per channel
    st = ctx.calib.stats[ctx.info.site("blocks.5.attn.qkv").inputs[0].tensor]
    assert np.abs(st.ch_mean).max() < 0.05 * np.abs(st.sample).max() + 1e-3 or \
        np.abs((st.ch_min + st.ch_max) / 2).max() < 1e-3


def test_sqb_lowers_layer_error(sqb_w4a4):
    ctx = sqb_w4a4[0]
    rep = ctx.report["sqb"]
    assert all(v["err_after"] <= v["err_before"] for v in rep.values())
    assert np.mean([v["err_after"] / v["err_before"] for v in rep.values()]) < 0.9


def test_smoothing_score_with_and_without_weights():
    """Activation-only scoring where GPTQ rounding follows at fixed widths; the full score elsewhere."""
    assert not QuantConfig(recipe="mptq", wbits=4, abits=4).smoothing_scores_weights()
    assert QuantConfig(recipe="mptq", target_bits=5).smoothing_scores_weights()  # Greedy MP
    assert QuantConfig(recipe="mptq", weight_rounding="nearest").smoothing_scores_weights()
    assert QuantConfig(recipe="mptq-paper").smoothing_scores_weights()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    mu, s = np.full(16, 0.1, np.float32), np.linspace(0.5, 2.0, 16).astype(np.float32)
    y = x @ w
    xq = _quick_act((x - mu) / s, 3)
    act_only = np.square(xq @ (w * s[:, None]) + mu @ w - y).sum() / np.square(y).sum()
    assert group_error(x, [w], [y], mu, s, 3, 3, weights=False) == pytest.approx(act_only, rel=1e-5)
    # rounding the weights too (3 bits) adds their error
    assert group_error(x, [w], [y], mu, s, 3, 3) > 1.2 * act_only


def test_attn_smooth_keeps_float_model_and_rescales_stats(calibrated, calib):
    ctx = _copy(calibrated, wbits=4, abits=4)
    before = _run(ctx.model, calib[:8])
    qk = ctx.info.site("blocks.4.attn.q@k")
    proj = ctx.info.site("blocks.4.attn.proj")
    res = AttnSmooth()(ctx)
    assert res.modified
    rep = ctx.report["attn_smooth"]
    assert any(v["kind"] == "qk" for v in rep.values()) and any(v["kind"] == "v-proj" for v in rep.values())
    assert all(v["err_after"] < v["err_before"] for v in rep.values())
    after = _run(ctx.model, calib[:8])
    assert np.abs(after - before).max() / np.abs(before).max() < 1e-4
    # the stored statistics describe the rescaled tensors: recalibrate and compare
    fresh = _ctx(ctx.model, calib, wbits=4, abits=4).calib.stats
    for t in [i.tensor for i in qk.inputs] + [proj.inputs[0].tensor]:
        a, b = ctx.calib.stats[t], fresh[t]
        np.testing.assert_allclose(a.sample, b.sample, rtol=1e-3, atol=1e-3 * np.abs(b.sample).max())
        if t == proj.inputs[0].tensor:  # row statistics transform exactly
            assert a.max == pytest.approx(b.max, rel=1e-3) and a.min == pytest.approx(b.min, rel=1e-3)
        else:  # whole-tensor ranges beyond the kept images are estimated (see attn_smooth._rescaled)
            assert 0.7 < a.max / b.max < 1.4 and 0.7 < a.min / b.min < 1.4


def test_attn_smooth_reverts_on_unexpected_layout(calibrated):
    """If the qkv column layout is not [3, heads, dim], the float check catches it and undoes all."""
    ctx = _copy(calibrated, wbits=4, abits=4)
    w_before = {s.weight: ctx.weight(s.weight).copy() for s in ctx.info.by_role("qkv", "proj")}
    import mptq_onnx.passes.attn_smooth as A
    orig = A.set_w_in_out
    A.set_w_in_out = lambda c, site, w: orig(c, site, w[:, ::-1] if site.role == "qkv" else w)  # a wrong layout
    try:
        res = AttnSmooth()(ctx)
    finally:
        A.set_w_in_out = orig
    assert not res.modified and "not timm's" in res.summary
    for k, v in w_before.items():
        np.testing.assert_array_equal(ctx.weight(k), v)


def test_optm_picks_special_quantizers_at_4_bits(optm_w4a4):
    ctx = optm_w4a4
    kinds = {p.site.role: p.acts[0].kind for p in ctx.plan.values()}
    assert kinds["fc2"] in ("region", "uniform")
    assert sum(p.acts[0].kind == "region" for p in ctx.plan.values() if p.site.role == "fc2") >= 6
    assert sum(p.acts[0].kind == "log2" for p in ctx.plan.values() if p.site.role == "av") >= 6


def test_simulation_matches_qdq(optm_w4a4, calib):
    """The fake-quant graph Greedy MP scores with computes what the QDQ model computes, up to the
    rounding of the integer kernels onnxruntime fuses 8-bit QDQ into (the image input is 8-bit)."""
    ctx = optm_w4a4
    qdq, _ = write_plan(ctx.model, ctx.plan, "qdq")
    sim, _ = write_plan(ctx.model, ctx.plan, "sim")
    a, b = _run(qdq, calib), _run(sim, calib)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.85
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995


def test_tail_scorer_matches_whole_runs(optm_w8a8, calib):
    """Running from a cut on cached activations gives the logits of running the whole graph."""
    ctx = _copy(optm_w8a8, wbits=8, abits=8)  # its site optimizer fills its cache with more widths
    prov = ctx.site_optimizer
    sim = build_simulator(ctx, prov, {(n, "a"): 8 for n in ctx.plan}, 8)
    imgs = calib[:6]
    sites = [p.site for p in ctx.plan.values()]
    base = sim.feeds(sites[3].name, "a0", prov.acts(sites[3], 4)[0])  # a base that is not all-high
    tails = TailScorer(sim, imgs, base)
    assert tails._big  # the larger weights reach the tail sessions as arrays, not serialized
    moves = []
    for s in sites[5::7]:  # early to late blocks, every role in turn
        f = sim.feeds(s.name, "w", prov.weight(s, 4)) if s.weight else {}
        for i, q in enumerate(prov.acts(s, 3)):
            f.update(sim.feeds(s.name, f"a{i}", q))
        moves.append(f)
    tails.prepare(moves)
    starts = [tails.start(f) for f in moves]
    assert len(set(starts)) >= 4 and min(starts) < max(starts)  # several cuts are used
    for f in moves:
        np.testing.assert_allclose(tails.run(f), sim.run(imgs, {**base, **f}), rtol=1e-5, atol=1e-5)
        assert len(tails._sess) <= 1  # one tail session alive at a time (each holds weights and an arena)


def test_greedy_mp_reaches_budget(calibrated):
    ctx = _copy(calibrated, wbits=8, abits=8, target_bits=6.0, mp_candidates=(8, 6, 4), mp_images=4)
    UniformParams()(ctx)
    res = GreedyMP()(ctx)
    wb, ab = average_bits(ctx.plan, ctx.report["act_sizes"])
    assert wb <= 6.0 + 1e-6 and ab <= 6.0 + 1e-6
    assert wb > 5.0 and ab > 5.0  # it stops at the budget, not far below
    bits = {p.w_bits for p in ctx.plan.values() if p.w_bits} | {p.a_bits for p in ctx.plan.values()}
    assert len(bits) >= 2  # mixed, not uniform
    mp = ctx.report["greedy_mp"]
    assert mp["path"] and mp["kl_end"] >= 0 and "moves" in res.summary


def test_greedy_mp_with_optm_kinds(optm_w8a8):
    """OPT-m's region (post-GELU) and log2 (post-Softmax) slots can be lowered and fed."""
    # OPT-m at W8A8 does not read target_bits (only whether to keep the Hessians it recomputes)
    ctx = _copy(optm_w8a8, wbits=8, abits=8, target_bits=5.0, mp_candidates=(8, 5, 3), mp_images=4)
    GreedyMP()(ctx)
    wb, ab = average_bits(ctx.plan, ctx.report["act_sizes"])
    assert wb <= 5.0 + 1e-6 and ab <= 5.0 + 1e-6
    assert {p.acts[0].kind for p in ctx.plan.values() if p.site.role == "fc2"} <= {"region", "uniform"}


def test_image_input_held_at_image_bits(calibrated):
    ctx = _copy(calibrated, wbits=4, abits=4)
    UniformParams()(ctx)
    pe = ctx.plan["patch_embed.proj"]
    assert pe.a_bits == 8 and pe.acts[0].bits == 8 and pe.w_bits == 4
    assert {p.a_bits for n, p in ctx.plan.items() if n != "patch_embed.proj"} == {4}
    ctx = _copy(calibrated, wbits=4, abits=4, image_bits=None)
    UniformParams()(ctx)
    assert ctx.plan["patch_embed.proj"].acts[0].bits == 4
    with pytest.raises(MptqError, match="image-bits"):
        QuantConfig(image_bits=12).validate()


def test_greedy_mp_never_moves_the_image_input(calibrated):
    ctx = _copy(calibrated, wbits=8, abits=8, target_bits=4.5, mp_candidates=(8, 4, 3), mp_images=4,
               image_bits=6)
    UniformParams()(ctx)
    GreedyMP()(ctx)
    assert ctx.plan["patch_embed.proj"].a_bits == 6
    assert ctx.plan["patch_embed.proj"].acts[0].bits == 6
    assert all(s["site"] != "patch_embed.proj" or s["type"] == "w" for s in ctx.report["greedy_mp"]["path"])
    wb, ab = average_bits(ctx.plan, ctx.report["act_sizes"])
    assert ab <= 4.5 + 1e-6  # the held 6 bits count in the average


def test_cost_table_extrapolates_from_low_bits():
    t = cost_table({3: 0.8, 4: 0.2}, [8, 6, 5, 4, 3])
    assert t[8] == 0 and t[4] == 0.2 and t[3] == 0.8
    assert t[5] == pytest.approx(0.05) and t[6] == pytest.approx(0.0125)
    # a noisy measurement (lower cost at fewer bits) still gives a cost growing by >= 2x per bit
    t = cost_table({3: 0.1, 4: 0.2}, [8, 6, 4, 3])
    assert t[3] >= t[4] and t[6] == pytest.approx(0.2 / 4)
    assert cost_table({}, [8]) == {8: 0.0}


def test_kl_divergence():
    z = np.random.default_rng(0).standard_normal((4, 10))
    assert kl_divergence(z, z) == pytest.approx(0, abs=1e-12)
    assert kl_divergence(z, -z) > 0.5


def test_already_quantized_is_rejected(calibrated, calib):
    ctx = _copy(calibrated, wbits=8, abits=8)
    UniformParams()(ctx)
    q, _ = write_plan(ctx.model, ctx.plan, "qdq")
    with pytest.raises(MptqError, match="already quantized"):
        Canonicalize()(Context(q, QuantConfig(), calib))


def test_gptq_rounding_brings_logits_closer_and_stores_codes(model, calibrated, calib):
    """W4A8: error-compensating rounding moves the quantized logits towards float on the
    calibration images, and every rounded weight sits on its quantizer's grid (the stored codes)."""
    ctx = _copy(calibrated, wbits=4, abits=8)
    OptM()(ctx)
    ref = _run(model, calib)
    nearest, _ = write_plan(ctx.model, ctx.plan, "qdq")
    res = GPTQRounding()(ctx)
    rounded, _ = write_plan(ctx.model, ctx.plan, "qdq")
    assert res.modified and "gptq" in ctx.plan["blocks.0.mlp.fc1"].method_str()
    mse = lambda m: float(np.square(_run(m, calib) - ref).mean())  # noqa: E731
    assert mse(rounded) < 0.8 * mse(nearest)
    for p in ctx.plan.values():
        if "gptq" in p.methods:
            w = ctx.weight(p.site.weight)
            np.testing.assert_array_equal(fake_quant(w, p.weight), w)


def _share_ln_params(model):
    """The embedded model with every LayerNorm's γ and β merged into one tensor each, as the torch
    exporter merges them when they are equal (random or fresh weights)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    lns = [n for n in m.graph.node if n.op_type == "LayerNormalization"]
    for n in lns[1:]:
        n.input[1], n.input[2] = lns[0].input[1], lns[0].input[2]
    used = {x for n in m.graph.node for x in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def test_shared_parameters_are_unshared_and_sqb_keeps_float(model, calib):
    from mptq_onnx.passes.base import PassManager
    shared = _share_ln_params(model)
    ctx = Context(shared, QuantConfig(progress=False, wbits=4, abits=4), calib)
    PassManager([Canonicalize(), Calibrate()], verbose=False)(ctx)
    gammas = [n.input[1] for n in ctx.model.graph.node if n.op_type == "LayerNormalization"]
    assert len(gammas) == 25 and len(set(gammas)) == 25
    before = _run(shared, calib[:8])
    PassManager([AttnSmooth(), SmoothQuantBias()], verbose=False)(ctx)
    assert ctx.report["sqb_groups"] > 0
    after = _run(ctx.model, calib[:8])
    assert np.abs(after - before).max() < 1e-4 * np.abs(before).max()
    assert set(ctx.report["float_check"]) == {"attn-smooth", "sq-b"}
    # a model that shares nothing is left as it is
    from mptq_onnx.passes.canonicalize import canonicalize_model
    plain, _ = canonicalize_model(model)
    ctx = Context(model, QuantConfig(progress=False), calib)
    res = Canonicalize()(ctx)
    assert "shared" not in res.summary
    assert ctx.model.SerializeToString() == plain.SerializeToString()


def test_float_check_names_the_pass_that_broke_the_model(model, calib):
    from mptq_onnx.passes.base import Pass, PassManager, PassResult

    class Breaks(Pass):
        name = "breaks-float"
        preserves_float = True

        def __call__(self, ctx):
            w = ctx.info.site("head").weight
            ctx.set_initializer(w, ctx.weight(w) * 1.01)
            return PassResult(ctx, True)

    ctx = _ctx(model, calib[:4])
    with pytest.raises(MptqError, match="'breaks-float' should keep the float model"):
        PassManager([Breaks()], verbose=False)(ctx)
    Breaks.preserves_float = False  # a pass that does not claim to keep it is not checked
    PassManager([Breaks()], verbose=False)(ctx)


def test_node_metadata_names_every_quantizer_of_attention_matmuls(model, calib):
    """q@k and attn@v quantize both operands: each QuantizeLinear feeding them is in the node's
    metadata under its operand's name, and they are not reported as having float weights."""
    from mptq_onnx.passes.qdq import input_labels
    ctx = _ctx(model, calib[:8], wbits=8, abits=8)
    UniformParams()(ctx)
    q, _ = write_plan(ctx.model, ctx.plan, "qdq")
    producer = {o: n for n in q.graph.node for o in n.output}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    checked = 0
    for n in q.graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        if meta.get("mptq.role") not in ("qk", "av"):
            continue
        assert "mptq.w_bits" not in meta and meta["mptq.weights"] == "none (activation x activation)"
        acts = {k for k in meta if k.startswith("mptq.act.")}
        assert acts == {f"mptq.act.{x}" for x in input_labels(meta["mptq.role"], 2)}
        for label, x in zip(input_labels(meta["mptq.role"], 2), n.input):
            dq = producer[x]
            assert dq.op_type == "DequantizeLinear"
            ql = producer[dq.input[0]]
            ql = producer[ql.input[0]] if ql.op_type == "Clip" else ql
            assert ql.op_type == "QuantizeLinear"
            scale, zp = float(inits[ql.input[1]]), int(inits[ql.input[2]])
            assert meta[f"mptq.act.{label}"].startswith(f"uniform8 s={scale:.3g} zp={zp}")
            checked += 1
    assert checked == 2 * 24


def test_softmax_quantizer_sulq(calibrated, calib):
    """softmax_quantizer="sulq" puts SULQ on every post-Softmax input, and only there, in the
    uniform recipe and in OPT-m; its QDQ model computes what Greedy MP's fed simulation computes."""
    ctx = _copy(calibrated, wbits=8, abits=4, softmax_quantizer="sulq")
    UniformParams()(ctx)
    kinds = {(p.site.role, a.kind, q.kind) for p in ctx.plan.values() for a, q in zip(p.site.inputs, p.acts)}
    assert {k for r, a, k in kinds if a == "post_softmax"} == {"sulq"}
    assert {r for r, a, k in kinds if a == "post_softmax"} == {"av"}
    assert all(k != "sulq" for r, a, k in kinds if a != "post_softmax")
    qdq, _ = write_plan(ctx.model, ctx.plan, "qdq")
    assert sum("act.attn=sulq4" in n.doc_string and "(post_softmax)" in n.doc_string
               for n in qdq.graph.node) == 12
    imgs = calib[:8]
    prov = UniformProvider(ctx)
    sim = build_simulator(ctx, prov, {(n, "a"): p.a_bits for n, p in ctx.plan.items()}, 8)
    a, b = sim.run(imgs, {}), _run(qdq, imgs)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.85 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995
    av = [p.site for p in ctx.plan.values() if p.site.role == "av"]
    # η: the grid's best by the attn·V error
    (sa, sb), q = (ctx.calib.stats[t.tensor] for t in av[0].inputs), ctx.plan[av[0].name].acts[0]
    err = lambda q: float(np.square(fake_quant(sa.sample, q) @ sb.sample - sa.sample @ sb.sample).sum())  # noqa: E731
    assert all(err(q) <= err(sulq_quantizer(sa.min, sa.max, 4, eta)) for eta in SULQ_ETAS)
    opt = SiteOptimizer(ctx)  # OPT-m: SULQ alone, η by the attn·V error
    assert opt.act_kinds(av[0], 0) == ["sulq"] and prov.act_kinds(av[0], 0) == ["sulq"]
    assert {opt.acts(s, 3)[0].kind for s in av[:3]} == {"sulq"}
    ctx.config.softmax_quantizer = "default"
    assert "sulq" not in SiteOptimizer(ctx).act_kinds(av[0], 0)
    assert UniformProvider(ctx).act_kinds(av[0], 0) == ["uniform"]
    with pytest.raises(MptqError, match="softmax-quantizer"):
        QuantConfig(softmax_quantizer="log2").validate()


def test_ias_before_stage_3_reports_float_weights(calibrated):
    """`ias` stopped after stage 1 or 2 keeps float weights: the plan, the report and the
    per-node metadata say so (they said W4, which `deploy` would have read as int4 weights)."""
    from mptq_onnx.passes.ias import IasActQuant, IasWeights
    from mptq_onnx.passes.qdq import WriteQDQ
    ctx = _copy(calibrated, recipe="ias", wbits=4, abits=4)
    IasActQuant()(ctx)
    assert all(p.w_bits is None and p.weight is None for p in ctx.plan.values())
    staged = copy.deepcopy(ctx, {id(ctx.calib_images): ctx.calib_images})
    WriteQDQ()(ctx)
    assert ctx.report["avg_w_bits"] == 32.0 and ctx.report["avg_a_bits"] < 5
    meta = {n.name: {p.key: p.value for p in n.metadata_props} for n in ctx.model.graph.node}
    site_meta = [m for m in meta.values() if "mptq.w_bits" in m]
    assert site_meta and all(m["mptq.w_bits"] == "float" for m in site_meta)
    IasWeights()(staged)  # stage 3's quantizers: W4 from here on
    assert {p.w_bits for p in staged.plan.values() if p.site.weight} == {4}
    assert average_bits(staged.plan)[0] == 4.0
