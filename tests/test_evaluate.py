"""mptq_onnx.evaluator: sessions, accuracy against a numpy reference, error cases."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from mptq_onnx.errors import MptqError
from mptq_onnx.evaluator import EvalResult, evaluate, make_session
from mptq_onnx.modelio import Preprocess, set_preprocess

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
PP = Preprocess(input_size=(3, 8, 8), mean=MEAN, std=STD, interpolation="bicubic", crop_pct=1.0)
REPO = Path(__file__).resolve().parents[1]


def tiny_classifier(weight: np.ndarray, batch: int | str = "N", hw: int = 8,
                    pp: Preprocess | None = PP) -> onnx.ModelProto:
    """logits = mean_{h,w}(x) @ weight  (weight: [3, C])."""
    c = weight.shape[1]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, hw, hw])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, c])
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(weight.astype(np.float32), "W")]
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m)
    if pp is not None:
        set_preprocess(m, pp)
    return m


def make_dataset(root: Path, n_classes: int, per_class: int, seed: int = 0) -> Path:
    """Images whose mean colour is near a per-class prototype, plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(40, 216, size=(n_classes, 3))
    for c in range(n_classes):
        d = root / f"c{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            px = protos[c] + rng.integers(-60, 61, size=(8, 8, 3))
            Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def prototype_weight(root: Path, n_out: int | None = None, seed: int = 1) -> np.ndarray:
    """A weight that ranks classes by similarity to a noisy class-mean colour."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    means = []
    for d in dirs:
        imgs = [np.asarray(Image.open(f).convert("RGB"), np.float64) for f in sorted(d.iterdir())]
        means.append(np.mean([im.mean(axis=(0, 1)) for im in imgs], axis=0))
    protos = (np.array(means) / 255.0 - 0.5) / 0.25  # normalized space
    protos += np.random.default_rng(seed).normal(scale=0.6, size=protos.shape)
    w = protos.T  # [3, C]: logits = pooled colour . prototype
    if n_out is not None and n_out > w.shape[1]:
        extra = np.random.default_rng(seed + 1).normal(size=(3, n_out - w.shape[1]))
        w = np.concatenate([w, extra], axis=1)
    return w.astype(np.float32)


def reference(root: Path, weight: np.ndarray, indices=None, per_image: bool = False):
    """top1/top5 computed with plain numpy/PIL, independent of mptq_onnx.data (and, with
    `per_image`, whether each image's top-1 is right)."""
    files, labels = [], []
    for c, d in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for f in sorted(d.iterdir()):
            files.append(f)
            labels.append(c)
    if indices is not None:
        files = [files[i] for i in indices]
        labels = [labels[i] for i in indices]
    x = np.stack([(np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0 - 0.5) / 0.25 for f in files])
    logits = x.mean(axis=(1, 2)) @ weight.astype(np.float64)
    y = np.array(labels)
    order = np.argsort(-logits, axis=1, kind="stable")
    top1 = float(np.mean(order[:, 0] == y))
    top5 = float(np.mean((order[:, :5] == y[:, None]).any(axis=1)))
    if per_image:
        return top1, top5, len(files), order[:, 0] == y
    return top1, top5, len(files)


@pytest.fixture(scope="module")
def ds12(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("ds") / "val", n_classes=12, per_class=5)
    return root, prototype_weight(root)


# ---------------------------------------------------------------- accuracy

def test_evaluate_matches_numpy_reference(ds12, tmp_path):
    root, w = ds12
    ref1, ref5, n, ref_hits = reference(root, w, per_image=True)
    assert 0.0 < ref1 < ref5 < 1.0, (ref1, ref5)  # the check below can tell right from wrong
    path = tmp_path / "m.onnx"
    onnx.save(tiny_classifier(w), path)
    r = evaluate(path, root, batch_size=7, progress=False)
    assert isinstance(r, EvalResult)
    assert r.images == n == 60
    assert r.top1 == pytest.approx(ref1, abs=1e-9)
    assert r.top5 == pytest.approx(ref5, abs=1e-9)
    assert r.images_per_s > 0 and r.seconds > 0
    assert set(r.to_dict()) == {"top1", "top5", "images", "images_per_s", "seconds"}
    np.testing.assert_array_equal(r.hits, ref_hits)  # per image, in the folder's order


def test_evaluate_proto_and_path_agree_and_batch_size_does_not_matter(ds12, tmp_path):
    root, w = ds12
    m = tiny_classifier(w)
    onnx.save(m, tmp_path / "m.onnx")
    a = evaluate(m, root, batch_size=64, progress=False)
    b = evaluate(tmp_path / "m.onnx", root, batch_size=1, progress=False, threads=1)
    assert (a.top1, a.top5, a.images) == (b.top1, b.top5, b.images)


def test_evaluate_limit_uses_spread_subset(ds12):
    root, w = ds12
    from mptq_onnx.data import spread_indices
    idx = spread_indices(60, 24)
    ref1, ref5, _ = reference(root, w, idx)
    r = evaluate(tiny_classifier(w), root, limit=24, progress=False)
    assert r.images == 24
    assert (r.top1, r.top5) == (pytest.approx(ref1), pytest.approx(ref5))


def test_evaluate_uses_model_metadata_preprocess(ds12):
    root, w = ds12
    other = Preprocess(input_size=(3, 8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0)
    a = evaluate(tiny_classifier(w, pp=PP), root, progress=False)
    b = evaluate(tiny_classifier(w, pp=other), root, progress=False)
    c = evaluate(tiny_classifier(w, pp=other), root, progress=False, preprocess=PP)
    assert a.top1 != b.top1  # the metadata changes the inputs ...
    assert (a.top1, a.top5) == (c.top1, c.top5)  # ... and an explicit preprocess overrides it


def test_evaluate_fixed_batch_model_pads_last_batch(ds12):
    root, w = ds12
    from mptq_onnx.data import spread_indices
    ref1, ref5, _ = reference(root, w, spread_indices(60, 30))
    r = evaluate(tiny_classifier(w, batch=4), root, batch_size=64, limit=30, progress=False)
    assert r.images == 30  # 7 full batches of 4 and one padded batch of 2
    assert (r.top1, r.top5) == (pytest.approx(ref1), pytest.approx(ref5))


def test_evaluate_extra_outputs_allowed_and_top5_none_below_five(tmp_path):
    root = make_dataset(tmp_path / "ds", n_classes=3, per_class=4)
    w = prototype_weight(root)
    ref1, _, _ = reference(root, w)
    r = evaluate(tiny_classifier(w), root, progress=False)
    assert r.top1 == pytest.approx(ref1) and r.top5 is None
    w7 = prototype_weight(root, n_out=7)
    r7 = evaluate(tiny_classifier(w7), root, progress=False)
    assert r7.top5 is not None and r7.top5 >= r7.top1


def test_evaluate_progress_bar_on_stderr_only(ds12, capsys):
    root, w = ds12
    evaluate(tiny_classifier(w), root, progress=True, limit=10)
    cap = capsys.readouterr()
    assert cap.out == "" and "eval" in cap.err
    evaluate(tiny_classifier(w), root, progress=False, limit=10)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- errors

def test_evaluate_too_few_model_classes(ds12):
    root, w = ds12
    with pytest.raises(MptqError, match="outputs 5 classes.*12 class folders"):
        evaluate(tiny_classifier(w[:, :5]), root, progress=False)


def test_evaluate_too_few_classes_dynamic_output(ds12):
    root, w = ds12
    m = tiny_classifier(w[:, :5])
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "C"  # not known before running
    with pytest.raises(MptqError, match="outputs 5 classes"):
        evaluate(m, root, progress=False)


def test_evaluate_input_size_mismatch(ds12):
    root, w = ds12
    with pytest.raises(MptqError, match="height"):
        evaluate(tiny_classifier(w, hw=16), root, progress=False, preprocess=PP)


def test_evaluate_missing_data_dir(ds12, tmp_path):
    _, w = ds12
    with pytest.raises(MptqError, match="not found"):
        evaluate(tiny_classifier(w), tmp_path / "nope", progress=False)


def test_evaluate_skips_corrupt_images(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n_classes=6, per_class=3)
    w = prototype_weight(root)
    (root / "c02" / "1.png").write_bytes(b"broken")
    r = evaluate(tiny_classifier(w), root, progress=False)
    assert r.images == 17
    assert capsys.readouterr().err.count("warning: skipping unreadable image") == 1


def test_make_session(tmp_path, ds12):
    _, w = ds12
    m = tiny_classifier(w)
    s = make_session(m, threads=1)
    assert isinstance(s, ort.InferenceSession)
    assert s.get_providers() == ["CPUExecutionProvider"]
    onnx.save(m, tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    out = make_session(tmp_path / "m.onnx").run(None, {"input": x})[0]
    np.testing.assert_allclose(out, x.mean(axis=(2, 3)) @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(MptqError, match="not found"):
        make_session(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    with pytest.raises(MptqError, match="cannot load"):
        make_session(tmp_path / "junk.onnx")


def test_make_session_external_data(tmp_path, ds12):
    _, w = ds12
    m = tiny_classifier(np.tile(w, (1, 30)))  # big enough for the size threshold
    onnx.save_model(m, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=256)  # the 16-byte axes stay inline
    assert (tmp_path / "ext.onnx.data").exists()
    x = np.ones((1, 3, 8, 8), np.float32)
    out = make_session(tmp_path / "ext.onnx").run(None, {"input": x})[0]
    np.testing.assert_allclose(out[0], np.tile(w, (1, 30)).sum(axis=0), rtol=1e-5)


def test_sessions_are_made_in_one_place():
    """Issue 25: every onnxruntime session in the package and the tools comes from runtime.make_session."""
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    made = [str(p.relative_to(repo)) for d in ("mptq_onnx", "tools") for p in (repo / d).rglob("*.py")
            if "InferenceSession(" in p.read_text() and p.name != "runtime.py"]
    assert made == []
