"""End to end: convert real timm architectures and the embedded model; CLI behaviour on bad input."""
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from mptq_onnx.calibrate import session
from mptq_onnx.cli import main
from mptq_onnx.convert import convert
from mptq_onnx.data import load_calibration
from mptq_onnx.embedded import embedded_calib_dir, embedded_val_dir, load_embedded_model
from mptq_onnx.evaluator import evaluate
from mptq_onnx.modelio import get_preprocess, load_model
from mptq_onnx.plan import QuantConfig


def _logits(m, x):
    s = session(m)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224"])
def test_timm_224_w8a8_agrees_with_float(timm_onnx, name):
    path = timm_onnx(name)
    model = load_model(path)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
    ctx = convert(model, calib, QuantConfig(wbits=8, abits=8, progress=False, batch_size=4), verbose=False)
    x = rng.standard_normal((3, 3, 224, 224)).astype(np.float32)
    f, q = _logits(model, x), _logits(ctx.model, x)
    cos = (f * q).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(q, axis=1)
    assert cos.min() > 0.99, cos
    n_sites = len(ctx.plan)
    assert {p.site.role for p in ctx.plan.values()} >= {"patch_embed", "qkv", "proj", "fc1", "fc2", "qk", "av", "head"}
    expected = {"deit_tiny_patch16_224": 74, "vit_small_patch16_224": 74, "swin_tiny_patch4_window7_224": 77}[name]
    assert n_sites == expected
    ops = [n.op_type for n in ctx.model.graph.node]
    assert ops.count("QuantizeLinear") >= n_sites


@pytest.mark.needs_torch
@pytest.mark.slow
def test_timm_224_mptq_with_shared_initializers_agrees_with_float(timm_onnx):
    """With random weights the exporter merges equal initializers (all LayerNorm γ, all zero biases);
    SQ-b and attention smoothing must rescale each node's own copy, not every user of the tensor."""
    model = load_model(timm_onnx("deit_tiny_patch16_224"))
    inits = {t.name for t in model.graph.initializer}
    lns = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len({n.input[1] for n in lns if n.input[1] in inits}) < len(lns)  # the export does share
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
    # whole attention tensors of 2 images, not 8, for OPT-m's and attention smoothing's searches at
    # 224 (a third of the test's time): what is checked is which tensors the passes rescale
    ctx = convert(model, calib, QuantConfig(recipe="mptq", wbits=8, abits=8, progress=False, batch_size=4,
                                            full_images=2), verbose=False)
    assert ctx.report["sqb_groups"] > 0
    assert not any("reverted" in p["summary"] for p in ctx.report["passes"])  # attention smoothing kept
    x = rng.standard_normal((3, 3, 224, 224)).astype(np.float32)
    f, q = _logits(model, x), _logits(ctx.model, x)
    cos = (f * q).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(q, axis=1)
    assert cos.min() > 0.99, cos


@pytest.fixture(scope="module")
def emb():
    m = load_embedded_model()
    return m, load_calibration(embedded_calib_dir(), get_preprocess(m), 64, progress=False)


def test_output_is_deterministic_and_annotated(emb, tmp_path):
    m, calib = emb
    cfg = dict(wbits=4, abits=8, progress=False)
    a = convert(m, calib, QuantConfig(**cfg), verbose=False).model
    b = convert(m, calib, QuantConfig(**cfg), verbose=False).model
    assert a.SerializeToString() == b.SerializeToString()
    meta = {p.key: p.value for p in a.metadata_props}
    table = json.loads(meta["mptq.quantization"])
    assert len(table["layers"]) == 74 and table["avg_w_bits"] == 4
    mm = [n for n in a.graph.node if any(p.key == "mptq.site" and p.value == "blocks.0.mlp.fc1"
                                          for p in n.metadata_props)]
    assert len(mm) == 1 and "w_bits=4" in mm[0].doc_string
    w = [t for t in a.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(w) == 50  # every Linear/Conv weight stored as packed INT4
    assert a.ByteSize() < 0.3 * m.ByteSize()


@pytest.mark.slow
def test_mptq_w4a4_clearly_beats_minmax(emb, shared_dir):
    """Guards the passes: if SQ-b/OPT-m silently stopped working, W4A4 would collapse towards MinMax."""
    m, calib = emb
    val = shared_dir / "data" / "tin_val_dev"
    mm = convert(m, calib, QuantConfig(wbits=4, abits=4, act_method="minmax", weight_method="minmax",
                                       progress=False), verbose=False).model
    mp = convert(m, calib, QuantConfig(wbits=4, abits=4, recipe="mptq", progress=False), verbose=False).model
    r_f = evaluate(m, val, limit=400, progress=False).top1
    r_mm = evaluate(mm, val, limit=400, progress=False).top1
    r_mp = evaluate(mp, val, limit=400, progress=False).top1
    assert r_mp > r_mm + 0.15, (r_f, r_mm, r_mp)
    assert r_mp > 0.8 * r_f, (r_f, r_mm, r_mp)


def test_cli_convert_inspect_eval(emb, tmp_path, capsys):
    m, _ = emb
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src))
    assert main(["convert", str(src), "--calib", str(embedded_calib_dir()), "--calib-size", "16",
                 "--wbits", "6", "--abits", "8", "-q"]) == 0
    out = tmp_path / "m.uniform_w6a8.onnx"
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["calibration_images"] == 16 and [p["pass"] for p in rep["passes"]] == \
        ["canonicalize", "calibrate", "uniform", "qdq"]
    # never overwritten silently
    assert main(["convert", str(src), "--calib", str(embedded_calib_dir()), "--wbits", "6", "--abits", "8", "-q"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "blocks.11.mlp.fc2" in text and "recipe uniform" in text
    assert main(["eval", str(out), "--data", str(embedded_val_dir()), "--limit", "40", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"top1", "top5", "images", "images_per_s"} and res["images"] == 40


@pytest.mark.parametrize("args,msg", [
    (["convert", "{tmp}/missing.onnx", "--calib", "{calib}"], "not found"),
    (["convert", "{tmp}/bad.onnx", "--calib", "{calib}"], "cannot read"),
    (["convert", "{tmp}/m.onnx", "--calib", "{calib}", "--wbits", "9"], "2 to 8"),
    (["convert", "{tmp}/m.onnx", "--calib", "{calib}", "--abits", "1"], "2 to 8"),
    (["convert", "{tmp}/m.onnx", "--calib", "{calib}", "--image-bits", "12"], "--image-bits"),
    (["convert", "{tmp}/m.onnx", "--calib", "{calib}", "--mp-images", "0"], "--mp-images"),
    (["convert", "{tmp}/m.onnx", "--calib", "{calib}", "--weight-rounding", "gptq"], "needs a recipe that runs opt-m"),
    (["convert", "{tmp}/m.onnx", "--calib", "{tmp}/empty"], "has no class sub-folders"),
    (["convert", "{tmp}/m.onnx", "--calib", "{calib}", "-o", "{tmp}/m.onnx", "--force"], "input model"),
    (["convert", "{tmp}/relu.onnx", "--calib", "{calib}"], "not a ViT"),
])
def test_cli_bad_input(emb, tmp_path, capsys, args, msg):
    from onnx import TensorProto, helper
    m, _ = emb
    onnx.save(m, str(tmp_path / "m.onnx"))
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf at all")
    (tmp_path / "empty").mkdir()
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])])
    onnx.save(helper.make_model(g), str(tmp_path / "relu.onnx"))
    argv = [a.format(tmp=tmp_path, calib=embedded_calib_dir()) for a in args] + ["-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mptq-onnx: error:") and "Traceback" not in err and msg in err
    assert len(err.strip().splitlines()) == 1


def test_library_convert_leaves_the_process_malloc_settings_alone(monkeypatch, tmp_path):
    """Issue 25: convert() (the library) does not call mallopt; the CLI sets it for its own process."""
    from mptq_onnx import calibrate
    from mptq_onnx.cli import main
    from mptq_onnx.convert import convert
    from mptq_onnx.data import load_calibration
    from mptq_onnx.embedded import embedded_calib_dir, load_embedded_model
    from mptq_onnx.modelio import get_preprocess, save_model
    from mptq_onnx.plan import QuantConfig

    calls = []

    class FakeLibc:
        def mallopt(self, *a):
            calls.append(a)
            return 1

        def malloc_trim(self, *a):
            return 0

    monkeypatch.setattr(calibrate, "_LIBC", FakeLibc())
    m = load_embedded_model()
    imgs = load_calibration(embedded_calib_dir(), get_preprocess(m), 4, progress=False)
    convert(m, imgs, QuantConfig(calib_size=4, progress=False), verbose=False)
    assert calls == []
    src = save_model(m, tmp_path / "m.onnx")
    assert main(["convert", str(src), "--calib", str(embedded_calib_dir()), "--calib-size", "4", "-q"]) == 0
    assert calls and calls[0][0] == calibrate._M_MMAP_THRESHOLD


@pytest.mark.slow
def test_demo_runs_from_an_installed_wheel(tmp_path):
    """Issue 25: the README's first command from a wheel installed outside the checkout (the
    embedded model and images are package data)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheel"), str(repo)]
    try:
        import setuptools
        if int(setuptools.__version__.split(".")[0]) >= 68:
            build.insert(5, "--no-build-isolation")  # no download of setuptools when a new one is here
    except ImportError:
        pass
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    whl = next((tmp_path / "wheel").glob("mptq_onnx-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(whl)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    code = ("import sys, mptq_onnx; from mptq_onnx.cli import main; print(mptq_onnx.__file__); "
            "sys.exit(main(['demo', '--recipe', 'uniform', '--calib-size', '16', '-q', '--out-dir', 'out']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(str(tmp_path / "site"))  # the wheel's copy, not the checkout
    assert "top-1" in r.stdout and "404 val images" in r.stdout
