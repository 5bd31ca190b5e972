"""Bad inputs get one clear line and exit 2; odd but valid models convert (issue 13, items 3-10).

Each test builds what it needs from the embedded model in seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mptq_onnx.check import check_result
from mptq_onnx.cli import main
from mptq_onnx.embedded import embedded_calib_dir, embedded_val_dir, load_embedded_model
from mptq_onnx.errors import MptqError
from mptq_onnx.exporter import CLASS_NAMES_KEY
from mptq_onnx.modelio import save_model, set_metadata

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def model():
    return load_embedded_model()


def _convert(tmp_path, m, *extra, name="in.onnx", calib=None):
    src = tmp_path / name
    if not src.exists():
        save_model(m, src)
    out = tmp_path / "out.onnx"
    rc = main(["convert", str(src), "--calib", str(calib or embedded_calib_dir()), "--calib-size", "4",
               "-o", str(out), "-q", *extra])
    return rc, out


def _set_init(m, name, fn):
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            a = fn(numpy_helper.to_array(t).copy())
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, name))
            return
    raise KeyError(name)


# ---------------------------------------------------------------- item 3: non-finite weights

@pytest.mark.parametrize("recipe", ["uniform", "mptq"])
def test_nonfinite_weight_is_rejected_naming_the_tensor(tmp_path, model, capsys, recipe):
    name = "blocks.3.attn.qkv.bias"

    def poison(a):
        a.reshape(-1)[3] = np.nan
        return a
    _set_init(model, name, poison)
    rc, out = _convert(tmp_path, model, "--recipe", recipe)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert name in err and "NaN" in err and "Traceback" not in err


# ---------------------------------------------------------------- item 4: integer calibration arrays

@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_integer_calibration_array_is_rejected(tmp_path, model, capsys, dtype):
    arr = np.random.default_rng(0).integers(0, 127, size=(4, 3, 64, 64)).astype(dtype)
    np.save(tmp_path / "calib.npy", arr)
    rc, out = _convert(tmp_path, model, calib=tmp_path / "calib.npy")
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "float32" in err and "preprocessed" in err


# ---------------------------------------------------------------- item 5: eval on mismatched classes

def _subset(tmp_path, n):
    root = tmp_path / "subset"
    root.mkdir()
    # from the middle: the first folders have the same index by name and by position, so a
    # subset taken there cannot tell name labelling from position labelling
    dirs = sorted(embedded_val_dir().iterdir())
    for d in dirs[len(dirs) // 2:len(dirs) // 2 + n]:
        (root / d.name).symlink_to(d, target_is_directory=True)
    return root


def test_eval_refuses_a_folder_missing_classes(tmp_path, model, capsys):
    save_model(model, tmp_path / "m.onnx")
    rc = main(["eval", str(tmp_path / "m.onnx"), "--data", str(_subset(tmp_path, 5)), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "5 class folders" in err and "202 classes" in err


def test_eval_with_class_names_scores_a_subset_and_refuses_foreign_folders(tmp_path, model, capsys):
    names = sorted(p.name for p in embedded_val_dir().iterdir())
    set_metadata(model, CLASS_NAMES_KEY, json.dumps(names))
    save_model(model, tmp_path / "m.onnx")
    # every class folder, labelled by name; 80 of its 404 images are enough to score above 0
    full = main(["eval", str(tmp_path / "m.onnx"), "--data", str(embedded_val_dir()), "--limit", "80", "--json",
                 "-q"])
    full_res = json.loads(capsys.readouterr().out)
    assert full == 0
    # a subset is labelled by name, so its images score as they did in the full folder
    assert main(["eval", str(tmp_path / "m.onnx"), "--data", str(_subset(tmp_path, 20)), "--json", "-q"]) == 0
    sub = json.loads(capsys.readouterr().out)
    assert sub["images"] == 40 and 0 < sub["top1"] <= 1 and full_res["top1"] > 0
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for d in sorted(embedded_val_dir().iterdir()):
        (renamed / f"class_{d.name}").symlink_to(d, target_is_directory=True)
    rc = main(["eval", str(tmp_path / "m.onnx"), "--data", str(renamed), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "not classes of this model" in err


def test_eval_fails_on_nan_logits(tmp_path, model, capsys):
    head_b = next(t.name for t in model.graph.initializer if t.name.startswith("head") and len(t.dims) == 1)
    _set_init(model, head_b, lambda a: a * np.float32(np.nan))
    save_model(model, tmp_path / "m.onnx")
    rc = main(["eval", str(tmp_path / "m.onnx"), "--data", str(embedded_val_dir()), "--limit", "8", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "NaN/Inf logits for 8 of 8 images" in err


# ---------------------------------------------------------------- item 6: the result is checked

def test_report_carries_a_fidelity_check(tmp_path, model, capsys):
    rc, out = _convert(tmp_path, model)
    assert rc == 0
    chk = json.loads(out.with_suffix(".report.json").read_text())["check"]
    assert chk["images"] == 4 and 0 <= chk["top1_agreement"] <= 1 and chk["kl"] >= 0
    assert chk["warning"] is None  # W8A8 of a real model is close to float


def test_check_result_warns_when_far_from_float_and_rejects_bad_scales(model, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 64, 64)).astype(np.float32)
    far = rng.standard_normal((4, 202)).astype(np.float32) * 30  # not this model's logits
    res = check_result(model, x, far, bits=8)
    assert res.warning and "far from float" in capsys.readouterr().err
    q = onnx.helper.make_node("QuantizeLinear", ["x", "s_bad"], ["y"])
    model.graph.node.append(q)
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "s_bad"))
    with pytest.raises(MptqError, match="s_bad"):
        check_result(model, x, far, bits=8)


# ---------------------------------------------------------------- item 7: symlink loops

def test_symlink_loop_lists_each_image_once(tmp_path):
    root = tmp_path / "loop"
    src = sorted(embedded_calib_dir().iterdir())[:2]
    for d in src:
        (root / d.name).mkdir(parents=True)
        for f in d.iterdir():
            (root / d.name / f.name).write_bytes(f.read_bytes())
    (root / src[0].name / "up").symlink_to("..", target_is_directory=True)  # loop to the root
    (root / src[1].name / "self").symlink_to(".", target_is_directory=True)  # loop to itself
    (root / src[1].name / "other").symlink_to(f"../{src[0].name}", target_is_directory=True)
    code = ("import sys; from mptq_onnx.data import ImageFolder; from mptq_onnx.modelio import Preprocess; "
            f"d = ImageFolder({str(root)!r}, Preprocess(input_size=(3, 64, 64))); "
            "print([(p.rsplit('/', 2)[-2], y) for p, y in d.samples])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert eval(r.stdout) == [(src[0].name, 0), (src[1].name, 1)]


# ---------------------------------------------------------------- item 8: batch and input shape

def test_static_batch_of_one_converts(tmp_path, model, capsys):
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    rc, out = _convert(tmp_path, model)
    assert rc == 0, capsys.readouterr().err
    assert main(["eval", str(out), "--data", str(embedded_val_dir()), "--limit", "6", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6


def test_input_that_is_not_an_image_batch_is_one_line(tmp_path, model, capsys):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    del dims[3]
    rc, out = _convert(tmp_path, model)
    err = capsys.readouterr().err
    assert rc == 2 and "[N, C, H, W]" in err and "Traceback" not in err and not out.exists()


# ---------------------------------------------------------------- item 9: LayerNorm below opset 17

def decompose_layernorm(m: onnx.ModelProto) -> onnx.ModelProto:
    """Split every LayerNormalization as torch's exporter does below opset 17."""
    mk = onnx.helper.make_node
    nodes, inits = [], []
    for i, n in enumerate(m.graph.node):
        if n.op_type != "LayerNormalization":
            nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        p = f"/ln{i}/"
        inits += [numpy_helper.from_array(np.array([-1], np.int64), p + "axes"),
                  numpy_helper.from_array(np.array(2.0, np.float32), p + "two"),
                  numpy_helper.from_array(np.array(eps, np.float32), p + "eps")]
        x, g, b = n.input
        nodes += [mk("ReduceMean", [x, p + "axes"], [p + "m"], name=p + "ReduceMean"),
                  mk("Sub", [x, p + "m"], [p + "d"], name=p + "Sub"),
                  mk("Pow", [p + "d", p + "two"], [p + "p"], name=p + "Pow"),
                  mk("ReduceMean", [p + "p", p + "axes"], [p + "v"], name=p + "ReduceMean_1"),
                  mk("Add", [p + "v", p + "eps"], [p + "ve"], name=p + "Add"),
                  mk("Sqrt", [p + "ve"], [p + "s"], name=p + "Sqrt"),
                  mk("Div", [p + "d", p + "s"], [p + "n"], name=p + "Div"),
                  mk("Mul", [p + "n", g], [p + "g"], name=p + "Mul"),
                  mk("Add", [p + "g", b], [n.output[0]], name=p + "Add_1")]
        nodes[-9].metadata_props.extend(n.metadata_props)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    return m


def test_decomposed_layernorm_is_fused_and_converts_like_the_original(tmp_path, model, capsys):
    rc, ref = _convert(tmp_path, model, name="orig.onnx")
    assert rc == 0
    ref_bytes = ref.read_bytes()
    ref.unlink()
    ref.with_suffix(".report.json").unlink()
    dec = decompose_layernorm(load_embedded_model())
    assert not any(n.op_type == "LayerNormalization" for n in dec.graph.node)
    rc, out = _convert(tmp_path, dec, name="dec.onnx", )
    err = capsys.readouterr().err
    assert rc == 0, err
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert "fused 25 decomposed LayerNorms" in rep["passes"][0]["summary"]
    q = onnx.load(str(out))
    assert sum(n.op_type == "LayerNormalization" for n in q.graph.node) == 25
    sites = json.loads(next(p.value for p in q.metadata_props if p.key == "mptq.quantization"))["layers"]
    assert len(sites) == 74
    assert len(out.read_bytes()) == pytest.approx(len(ref_bytes), rel=0.01)


# ---------------------------------------------------------------- item 10: --skip that matches nothing

def test_skip_that_matches_nothing_is_an_error(tmp_path, model, capsys):
    rc, out = _convert(tmp_path, model, "--skip", "haed")
    err = capsys.readouterr().err
    assert rc == 2 and "'haed' matches no site or role" in err and "head" in err and not out.exists()
    rc, out = _convert(tmp_path, model, "--skip", "head")
    assert rc == 0


@pytest.mark.needs_torch
def test_real_opset16_export_converts(tmp_path, capsys):
    """torch's TorchScript exporter at opset 16 splits LayerNorm; the split form is fused back."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    import io

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.randn(1, 3, 32, 32),), buf, dynamo=False, opset_version=16,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    src = tmp_path / "op16.onnx"
    src.write_bytes(buf.getvalue())
    assert not any(n.op_type == "LayerNormalization" for n in onnx.load(str(src)).graph.node)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "q.onnx"
    rc = main(["convert", str(src), "--calib", str(tmp_path / "calib.npy"), "-o", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert "fused 5 decomposed LayerNorms" in rep["passes"][0]["summary"]
    assert rep["check"]["top1_agreement"] == 1.0
