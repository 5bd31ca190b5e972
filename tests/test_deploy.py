"""`deploy`: converted models lowered to onnxruntime's integer / 4-bit kernels, checked against the
graph onnxruntime actually runs (its optimized model) and against the simulation's outputs."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mptq_onnx.cli import main
from mptq_onnx.convert import convert
from mptq_onnx.data import load_calibration
from mptq_onnx.errors import MptqError
from mptq_onnx.deployer import (INTEGER_KERNELS, DeployConfig, deploy, deploy_file, kernel_counts,
                              optimized_graph, report_path)
from mptq_onnx.embedded import embedded_calib_dir, embedded_val_dir, load_embedded_model
from mptq_onnx.modelio import get_metadata, get_preprocess, save_model
from mptq_onnx.plan import QuantConfig

N_SITES = 74  # deit_tiny_tin: patch embed, 12 x (qkv, q@k, attn@v, proj, fc1, fc2), head
FLOAT_PRODUCTS = {"MatMul", "FusedMatMul", "Gemm", "Conv"}


@pytest.fixture(scope="module")
def emb():
    m = load_embedded_model()
    pp = get_preprocess(m)
    calib = load_calibration(embedded_calib_dir(), pp, 16, progress=False)
    val = load_calibration(embedded_val_dir(), pp, 64, progress=False)
    return m, calib, val


@pytest.fixture(scope="module")
def converted(emb, tmp_path_factory):
    """Factory: path of the embedded model converted with these settings (cached)."""
    m, calib, _ = emb
    d = tmp_path_factory.mktemp("deploy")
    cache = {}

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cfg = QuantConfig(progress=False, calib_size=16, **kw)
            name = "_".join(f"{k}{v}" for k, v in key)
            cache[key] = save_model(convert(m, calib, cfg, verbose=False).model, d / f"{name}.onnx")
        return cache[key]
    return make


def _run(path, x, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_w8a8_every_quantized_product_runs_an_integer_kernel(converted, tmp_path):
    rep = deploy_file(converted(wbits=8, abits=8), tmp_path / "d.onnx")
    assert len(rep.layers) == N_SITES and not rep.warnings
    assert all(r.form == "integer" and r.exact for r in rep.layers)
    counts = kernel_counts(optimized_graph(rep.output))
    # the patch-embedding Conv and the head Gemm included: nothing quantized is left in float
    assert sum(counts.get(k, 0) for k in INTEGER_KERNELS) == N_SITES, counts
    assert not FLOAT_PRODUCTS & set(counts), counts
    assert all(r.kernel in INTEGER_KERNELS for r in rep.layers)


def test_w8a8_agrees_with_the_simulation(converted, emb, tmp_path):
    src = converted(wbits=8, abits=8)
    rep = deploy_file(src, tmp_path / "d.onnx", DeployConfig(verify=False))
    x = emb[2]
    sim, dep = _run(src, x), _run(rep.output, x)
    assert (sim.argmax(1) == dep.argmax(1)).mean() >= 0.98
    assert np.abs(sim - dep).max() < 0.05 * np.abs(sim).max()
    # with onnxruntime's fusions off both are plain float QDQ arithmetic: the rewrites are exact up
    # to float summation order (which can flip a rounding in a later quantizer now and then)
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = _run(src, x[:8], off), _run(rep.output, x[:8], off)
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()


def test_w4_weights_become_matmulnbits(converted, emb, tmp_path):
    src = converted(wbits=4, abits=8)
    rep = deploy_file(src, tmp_path / "d.onnx", DeployConfig(accuracy_level=1))
    counts = kernel_counts(optimized_graph(rep.output))
    assert counts.get("MatMulNBits") == 50, counts  # 48 block linears, patch embedding, head
    levels = {a.i for n in onnx.load(str(rep.output)).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {1}  # what was asked for reaches the kernels (the default is 4)
    assert not {"MatMul", "Gemm", "Conv", "FusedMatMul"} & set(counts), counts
    assert (tmp_path / "d.onnx").stat().st_size < 1.1 * src.stat().st_size
    # accuracy_level 1: float32 products of the same 4-bit weights, the simulation's arithmetic
    x = emb[2][:16]
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = _run(src, x, off), _run(rep.output, x, off)
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9


def test_sub8_and_region_activations_lowered_exactly(converted, emb, tmp_path):
    """W8A4 mptq: 4-bit uniform activations widen to 8-bit codes behind a float Clip; the fc2
    region-wise quantizer splits into two integer MatMuls; log2 post-Softmax stays simulated."""
    src = converted(wbits=8, abits=4, recipe="mptq", weight_rounding="nearest")
    rep = deploy_file(src, tmp_path / "d.onnx")
    by_role = {}
    for r in rep.layers:
        by_role.setdefault(r.role, set()).add((r.form, r.kernel))
    assert by_role["fc2"] == {("integer", "MatMulIntegerToFloat+MatMulIntegerToFloat")}, by_role["fc2"]
    assert by_role["av"] == {("simulated", "MatMul")}  # log2 codes have no integer kernel
    for role in ("qkv", "proj", "fc1", "qk", "head", "patch_embed"):
        assert {f for f, _ in by_role[role]} == {"integer"}, (role, by_role[role])
    assert not rep.warnings
    x = emb[2][:16]
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = _run(src, x, off), _run(rep.output, x, off)
    # float summation order can flip a 4-bit rounding somewhere (a whole code step, which then
    # moves that image's logits); a wrong bound or scale would move every image
    same = np.abs(a - b).max(1) < 1e-4 * np.abs(a).max()
    assert same.mean() >= 0.75, np.abs(a - b).max(1)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9


def test_report_metadata_and_determinism(converted, tmp_path):
    src = converted(wbits=4, abits=8)
    rep = deploy_file(src, tmp_path / "a.onnx", DeployConfig(verify=False))
    deploy_file(src, tmp_path / "b.onnx", DeployConfig(verify=False))
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    j = json.loads(report_path(tmp_path / "a.onnx").read_text())
    assert [r["site"] for r in j["layers"]] == [r.site for r in rep.layers]
    assert len(j["layers"]) == N_SITES and {r["form"] for r in j["layers"]} == {"nbits", "integer"}
    import onnx
    m = onnx.load(str(tmp_path / "a.onnx"))
    meta = json.loads(get_metadata(m, "mptq.deploy"))
    assert meta["session_options"] == {} and meta["config"]["accuracy_level"] == 4
    tagged = [n for n in m.graph.node if any(p.key == "mptq.deploy" for p in n.metadata_props)]
    assert len(tagged) == N_SITES


def test_refusals(converted, emb, tmp_path, capsys):
    float_path = save_model(emb[0], tmp_path / "float.onnx")
    assert main(["deploy", str(float_path), "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a model converted by mptq-onnx" in err
    src = converted(wbits=8, abits=8)
    assert main(["deploy", str(src), "-o", str(src), "--force"]) == 2
    assert "input model" in capsys.readouterr().err
    out = tmp_path / "d.onnx"
    assert main(["deploy", str(src), "-o", str(out), "-q", "--no-verify"]) == 0
    assert main(["deploy", str(src), "-o", str(out), "-q", "--no-verify"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["deploy", str(out), "-o", str(tmp_path / "again.onnx")]) == 2
    assert "already deployed" in capsys.readouterr().err
    with pytest.raises(MptqError, match="not a model converted by mptq-onnx"):
        deploy(emb[0])
