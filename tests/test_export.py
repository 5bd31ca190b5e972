"""Export of timm models and model cards to ONNX; the embedded default model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mptq_onnx.errors import MptqError
from mptq_onnx.modelio import Preprocess, get_metadata, get_preprocess

TIMM_224 = {  # name -> number of attention blocks
    "deit_tiny_patch16_224": 12,
    "vit_small_patch16_224": 12,
    "swin_tiny_patch4_window7_224": 12,
}


def _session(path_or_model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    data = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _torch_logits(module, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------- random-weight timm models

@pytest.mark.needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TIMM_224))
def test_timm_export_matches_torch(timm_onnx, name):
    import timm

    from mptq_onnx.exporter import build_model

    path = timm_onnx(name)
    model = onnx.load(str(path))
    assert _opset(model) == 21
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value"), "batch axis must be dynamic"
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224]

    # attention as explicit MatMul -> Softmax -> MatMul, with module paths on the nodes
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Softmax") == TIMM_224[name]
    matmul = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert all(any(p.key == "pkg.torch.onnx.name_scopes" for p in n.metadata_props) for n in matmul)
    assert not any(p.key == "pkg.torch.onnx.stack_trace" for n in model.graph.node for p in n.metadata_props)

    built = build_model(name)  # same seed as the export: same weights
    sess = _session(path)
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
        got, ref = _run(sess, x), _torch_logits(built.module, x)
        assert got.shape == ref.shape == (batch, 1000)
        assert _cosine(got, ref) > 0.9999, (name, batch, float(np.abs(got - ref).max()))

    expected = Preprocess.from_dict(dict(timm.data.resolve_data_config({}, model=built.module)))
    assert get_metadata(model, "mptq.preprocess") is not None
    assert get_preprocess(model) == expected
    assert get_metadata(model, "mptq.source") == name
    assert get_metadata(model, "mptq.num_classes") == "1000"


@pytest.mark.needs_torch
def test_torchscript_exporter_and_opset_bump(tmp_path):
    pytest.importorskip("timm")
    from mptq_onnx.exporter import build_model, bump_opset, export_model, to_onnx

    built = build_model("deit_tiny_patch16_224", img_size=32, num_classes=10)
    assert built.preprocess.input_size == (3, 32, 32)
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    ref = _torch_logits(built.module, x)

    path = export_model("deit_tiny_patch16_224", tmp_path / "ts.onnx", img_size=32, num_classes=10,
                        exporter="torchscript", log=None)
    m = onnx.load(str(path))
    assert _opset(m) == 21 and m.ir_version >= 10
    assert get_preprocess(m).input_size == (3, 32, 32) and get_metadata(m, "mptq.num_classes") == "10"
    assert _cosine(_run(_session(path), x), ref) > 0.9999

    # the fallback when the version converter fails: raise the opset import after checking the ops
    m20 = to_onnx(built, exporter="torchscript", opset=20)
    assert _opset(m20) == 20
    m21 = bump_opset(m20, 21)
    assert _opset(m21) == 21
    assert _cosine(_run(_session(m21), x), ref) > 0.9999


# --------------------------------------------------------------------------- model cards

def _tiny_val_loader(root: Path, pp: Preprocess, limit: int):
    """ImageFolder order (sorted classes, sorted files): Pillow -> RGB -> /255 -> normalize."""
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.is_file()][:limit]
    mean = np.asarray(pp.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(pp.std, np.float32).reshape(3, 1, 1)
    xs = []
    for f, _ in samples:
        im = Image.open(f).convert("RGB")
        if im.size != (pp.input_size[2], pp.input_size[1]):
            im = im.resize((pp.input_size[2], pp.input_size[1]), Image.BICUBIC)
        xs.append((np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std)
    return np.stack(xs).astype(np.float32), np.array([lab for _, lab in samples])


@pytest.mark.needs_shared
@pytest.mark.needs_torch
@pytest.mark.slow
def test_card_export_deit_tin(deit_tin_onnx, shared_dir):
    card = json.loads((shared_dir / "models" / "deit_tiny_tin.json").read_text())
    model = onnx.load(str(deit_tin_onnx))
    assert _opset(model) == 21
    pp = get_preprocess(model)
    assert pp.input_size == tuple(card["input_size"]) == (3, 64, 64)
    assert pp.mean == tuple(card["preprocess"]["mean"]) and pp.std == tuple(card["preprocess"]["std"])
    assert pp.crop_pct == 1.0
    assert get_metadata(model, "mptq.source") == "deit_tiny_tin"
    assert get_metadata(model, "mptq.num_classes") == "202"

    x, y = _tiny_val_loader(shared_dir / "data" / "tin_val_dev", pp, 200)
    sess = _session(deit_tin_onnx)
    pred = np.concatenate([_run(sess, x[i:i + 50]).argmax(1) for i in range(0, len(x), 50)])
    top1 = float((pred == y).mean())
    assert top1 > 0.3, top1


@pytest.mark.needs_shared
@pytest.mark.needs_torch
def test_card_export_is_deterministic(deit_tin_onnx, tmp_path):
    from mptq_onnx.exporter import export_model

    again = export_model("deit_tiny_tin", tmp_path / "again.onnx", verify=False, log=None)  # by card name
    assert again.read_bytes() == Path(deit_tin_onnx).read_bytes()


@pytest.mark.needs_shared
@pytest.mark.needs_torch
def test_bad_checkpoint(shared_dir):
    from mptq_onnx.exporter import build_model

    with pytest.raises(MptqError, match="missing keys"):
        build_model(str(shared_dir / "models" / "deit_tiny_tin.json"),
                    checkpoint=shared_dir / "models" / "swin_tiny_tin.safetensors")


# --------------------------------------------------------------------------- embedded default

def test_embedded_model_loads_float32():
    from mptq_onnx.embedded import EMBEDDED_MODEL, load_embedded_model

    assert EMBEDDED_MODEL.stat().st_size < 12 * 2**20
    model = load_embedded_model()
    assert all(i.data_type != onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert not any(n.op_type == "Cast" for n in model.graph.node)
    assert get_metadata(model, "mptq.storage") is None
    assert get_preprocess(model).input_size == (3, 64, 64)
    onnx.checker.check_model(model, full_check=True)


def test_embedded_images():
    from mptq_onnx.embedded import EMBEDDED_DIR, embedded_calib_dir, embedded_val_dir

    for d, per_class in ((embedded_calib_dir(), 1), (embedded_val_dir(), 2)):
        classes = sorted(p for p in d.iterdir() if p.is_dir())
        assert len(classes) == 202
        assert all(len(list(c.iterdir())) == per_class for c in classes)
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file())
    assert total <= 15 * 2**20


@pytest.mark.needs_shared
@pytest.mark.needs_torch
def test_embedded_matches_card_export(embedded_onnx, deit_tin_onnx, shared_dir):
    x = np.random.default_rng(2).standard_normal((3, 3, 64, 64), dtype=np.float32)
    a, b = _run(_session(embedded_onnx), x), _run(_session(deit_tin_onnx), x)
    assert float(np.abs(a - b).max()) <= 1e-5
    # the images are byte-for-byte copies
    from mptq_onnx.embedded import embedded_val_dir

    f = sorted(sorted(embedded_val_dir().iterdir())[0].iterdir())[0]
    assert f.read_bytes() == (shared_dir / "data" / "tin_val_dev" / f.parent.name / f.name).read_bytes()


# --------------------------------------------------------------------------- errors

@pytest.mark.needs_torch
def test_unknown_name_suggests(tmp_path):
    pytest.importorskip("timm")
    from mptq_onnx.exporter import export_model

    with pytest.raises(MptqError, match="deit_tiny_patch16_224"):
        export_model("deit_tiny_patch16_244", tmp_path / "x.onnx", log=None)
    assert not (tmp_path / "x.onnx").exists()


def test_existing_output_needs_force(tmp_path):
    from mptq_onnx.exporter import export_model

    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(MptqError, match="exists"):
        export_model("deit_tiny_patch16_224", out, log=None)
    assert out.read_bytes() == b"keep me"


def test_missing_card(tmp_path):
    from mptq_onnx.exporter import export_model

    with pytest.raises(MptqError, match="card not found"):
        export_model(str(tmp_path / "no_such_card.json"), tmp_path / "x.onnx", log=None)
    with pytest.raises(MptqError, match="card not found"):
        export_model("cards/no_such_card.json", tmp_path / "x.onnx", log=None)
