"""Hugging Face models (issue 23): `export DIR` of save_pretrained folders, their preprocessing and
class names, and onnxruntime providers/threads on the user's side."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from mptq_onnx.cli import main
from mptq_onnx.embedded import embedded_calib_dir
from mptq_onnx.errors import MptqError
from mptq_onnx.modelio import get_metadata, get_preprocess

pytestmark = pytest.mark.needs_torch


def test_export_hf_folder_carries_preprocessing_and_class_names(hf_onnx, hf_dir):
    m = onnx.load(hf_onnx("vit"))
    pp = get_preprocess(m)
    assert pp.mean == (0.5, 0.5, 0.5) and pp.std == (0.5, 0.5, 0.5) and pp.input_size == (3, 32, 32)
    names = json.loads(get_metadata(m, "mptq.class_names"))
    assert names == [f"class_{chr(97 + i)}" for i in range(10)] and get_metadata(m, "mptq.class_names_from") == "id2label"
    assert get_metadata(m, "mptq.num_classes") == "10"
    d = get_preprocess(onnx.load(hf_onnx("deit")))  # resize 36, crop 32; ImageNet statistics
    assert d.input_size == (3, 32, 32) and d.crop_pct == pytest.approx(32 / 36) and d.mean[0] == 0.485
    # the placeholder names LABEL_0.. of a config that never named its classes are not class names
    assert get_metadata(onnx.load(hf_onnx("deit")), "mptq.class_names") is None


def test_export_hf_folder_without_preprocessor_config_says_so(hf_dir, tmp_path, capsys):
    out = tmp_path / "swin.onnx"
    assert main(["export", str(hf_dir("swin")), "-o", str(out), "--exporter", "torchscript"]) == 0
    err = capsys.readouterr()
    assert "no preprocessor_config.json" in err.out + err.err and "verified" in err.out + err.err
    m = onnx.load(out)
    assert get_metadata(m, "mptq.preprocess") is None  # nothing invented: convert will say what it assumes
    q = tmp_path / "q.onnx"
    assert main(["convert", str(out), "-o", str(q), "--calib", str(embedded_calib_dir()), "--calib-size", "16",
                 "--recipe", "uniform", "-q"]) == 0
    err = capsys.readouterr().err
    assert "no preprocessing in the model" in err and "--mean/--std" in err
    rep = json.loads(q.with_suffix(".report.json").read_text())
    assert rep["preprocess"]["source"] == "default (assumed)" and rep["preprocess"]["input_size"] == [3, 32, 32]


def test_export_hf_folder_refuses_timm_options(hf_dir, tmp_path):
    from mptq_onnx.exporter import export_model
    with pytest.raises(MptqError, match="brings its own weights"):
        export_model(str(hf_dir("vit")), tmp_path / "x.onnx", num_classes=5, log=None)


def test_hf_config_beside_an_onnx_file_names_the_classes(hf_onnx, tmp_path):
    """An optimum export (model.onnx + config.json): eval labels the folders by id2label names."""
    from mptq_onnx.evaluator import class_names, folder_labels
    d = tmp_path / "optimum"
    d.mkdir()
    m = onnx.load(hf_onnx("deit"))  # no class names in its metadata
    onnx.save(m, d / "model.onnx")
    labels = {str(i): n for i, n in enumerate(["cat", "dog", "emu", "fox", "gnu", "hen", "ibis", "jay", "kea", "lynx"])}
    (d / "config.json").write_text(json.dumps({"id2label": labels}))
    assert class_names(m, d / "model.onnx") == (list(labels.values()), "id2label")
    got = folder_labels(m, ["dog", "lynx", "cat"], tmp_path, d / "model.onnx")  # a subset, by name
    np.testing.assert_array_equal(got, [1, 9, 0])
    with pytest.raises(MptqError, match="not classes of this model"):
        folder_labels(m, ["dog", "n0001"], tmp_path, d / "model.onnx")
    notes = []  # no folder named like a class (wnids, say), as many as the classes: by position, said
    got = folder_labels(m, [f"n{i:04d}" for i in range(10)], tmp_path, d / "model.onnx", log=notes.append)
    np.testing.assert_array_equal(got, np.arange(10))
    assert len(notes) == 1 and "sorted position" in notes[0]


def test_eval_by_class_name_on_a_subset(hf_onnx, tmp_path):
    """Folders named by the model's id2label, in another order and only some: scored by name."""
    src = Path(embedded_calib_dir())
    data = tmp_path / "val"
    names = ["class_j", "class_a", "class_c"]
    for n, f in zip(names, sorted(src.iterdir())[:3]):
        shutil.copytree(f, data / n)
    from mptq_onnx.api import evaluate
    from mptq_onnx.evaluator import folder_labels
    np.testing.assert_array_equal(folder_labels(onnx.load(hf_onnx("vit")), sorted(names), data), [0, 2, 9])
    r = evaluate(hf_onnx("vit"), data)
    assert r.images == sum(len(list((data / n).iterdir())) for n in names)


def test_providers_and_threads(embedded_onnx, tmp_path, capsys):
    from mptq_onnx.runtime import parse_providers
    assert parse_providers(["cpu"]) == ("CPUExecutionProvider",)
    assert parse_providers("CPUExecutionProvider") == ("CPUExecutionProvider",)
    with pytest.raises(MptqError, match="not available in this onnxruntime.*available: .*CPUExecutionProvider"):
        parse_providers(["no_such_ep"])
    calib = str(embedded_calib_dir())
    assert main(["convert", str(embedded_onnx), "-o", str(tmp_path / "bad.onnx"), "--calib", calib,
                 "--providers", "no_such_ep"]) == 2
    assert "execution provider 'no_such_ep'" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
    assert main(["convert", str(embedded_onnx), "-o", str(tmp_path / "zero.onnx"), "--calib", calib,
                 "--threads", "0"]) == 2
    assert "--threads must be a positive integer" in capsys.readouterr().err
    q = tmp_path / "q.onnx"
    assert main(["convert", str(embedded_onnx), "-o", str(q), "--calib", calib, "--calib-size", "16",
                 "--threads", "1", "--providers", "cpu", "-q"]) == 0
    cfg = json.loads(q.with_suffix(".report.json").read_text())["config"]
    assert cfg["providers"] == ["CPUExecutionProvider"] and cfg["threads"] == 1
    capsys.readouterr()
    assert main(["eval", str(q), "--data", str(embedded_calib_dir()), "--limit", "32", "--threads", "1", "--json",
                 "--providers", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 32


def test_preprocessing_from_a_config_beside_the_model_is_said(hf_onnx, hf_dir, tmp_path, capsys):
    """An optimum-style export (no preprocessing in the model, preprocessor_config.json beside it):
    convert uses the config's mean = std = 0.5 and says where they came from."""
    from mptq_onnx.modelio import PREPROCESS_KEY
    d = tmp_path / "optimum"
    d.mkdir()
    m = onnx.load(hf_onnx("vit"))
    keep = [p for p in m.metadata_props if p.key != PREPROCESS_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    onnx.save(m, d / "model.onnx")
    shutil.copy(hf_dir("vit") / "preprocessor_config.json", d)
    assert main(["convert", str(d / "model.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(embedded_calib_dir()), "--calib-size", "16", "--recipe", "uniform", "-q"]) == 0
    err = capsys.readouterr().err
    assert "preprocessing from" in err and "preprocessor_config.json: mean (0.5, 0.5, 0.5)" in err
    rep = json.loads((tmp_path / "q.report.json").read_text())
    assert rep["preprocess"]["mean"] == [0.5, 0.5, 0.5] and rep["preprocess"]["source"].endswith(
        "preprocessor_config.json")
