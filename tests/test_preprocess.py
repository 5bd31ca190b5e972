"""Where the preprocessing comes from (issue 23): metadata, a Hugging Face preprocessor_config.json
beside the model, flags, else a default said in one line; the report and the output record it."""
import json

import onnx
import pytest

from mptq_onnx.cli import main
from mptq_onnx.embedded import embedded_calib_dir, embedded_val_dir, load_embedded_model
from mptq_onnx.errors import MptqError
from mptq_onnx.modelio import PREPROCESS_KEY, get_metadata, save_model
from mptq_onnx.preprocess import from_hf_config


def _bare(tmp_path, name="m.onnx"):
    """The embedded model without its preprocessing metadata (as a foreign export comes)."""
    m = load_embedded_model()
    keep = [p for p in m.metadata_props if p.key != PREPROCESS_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    (tmp_path / "model").mkdir(exist_ok=True)
    return save_model(m, tmp_path / "model" / name)


def test_hf_configs(tmp_path):
    vit = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
           "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 0.00392156862745098,
           "size": {"height": 224, "width": 224}, "image_processor_type": "ViTImageProcessor"}
    (tmp_path / "vit.json").write_text(json.dumps(vit))
    pp = from_hf_config(tmp_path / "vit.json")
    assert pp.mean == (0.5, 0.5, 0.5) and pp.std == (0.5, 0.5, 0.5) and pp.input_size == (3, 224, 224)
    assert pp.crop_pct == 1.0 and pp.interpolation == "bilinear"
    deit = {"do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "size": {"height": 256, "width": 256},
            "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (tmp_path / "deit.json").write_text(json.dumps(deit))
    pp = from_hf_config(tmp_path / "deit.json")
    assert pp.input_size == (3, 224, 224) and pp.crop_pct == 224 / 256 and pp.interpolation == "bicubic"
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(MptqError, match="not an image processor config"):
        from_hf_config(tmp_path / "bad.json")


def _convert(model, tmp_path, *extra):
    out = tmp_path / "q.onnx"
    rc = main(["convert", str(model), "--calib", str(embedded_calib_dir()), "--calib-size", "8", "-o", str(out),
               "-q", "--force", *extra])
    assert rc == 0
    return json.loads(out.with_suffix(".report.json").read_text())["preprocess"], onnx.load(str(out))


def test_preprocessor_config_beside_the_model_is_read(tmp_path, capsys):
    m = _bare(tmp_path)
    (m.parent / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 64, "width": 64},
         "resample": 2}))
    rep, q = _convert(m, tmp_path)
    assert rep["source"].endswith("preprocessor_config.json") and rep["mean"] == [0.5, 0.5, 0.5]
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]  # said, not guessed
    assert len(notes) == 1 and "preprocessing from" in notes[0] and "mean (0.5, 0.5, 0.5)" in notes[0]
    assert "assuming" not in notes[0]
    # the quantized model carries what calibration used, so `eval` reads it back
    assert json.loads(get_metadata(q, PREPROCESS_KEY))["mean"] == [0.5, 0.5, 0.5]


def test_a_guess_is_said_in_one_line(tmp_path, capsys):
    rep, _ = _convert(_bare(tmp_path), tmp_path)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert len(notes) == 1 and "--mean" in notes[0] and "0.485" in notes[0]
    assert rep["source"] == "default (assumed)" and rep["input_size"] == [3, 64, 64]


def test_flags_override_and_are_recorded(tmp_path, capsys):
    m = save_model(load_embedded_model(), tmp_path / "e.onnx")
    rep, _ = _convert(m, tmp_path, "--mean", "0.5", "0.5", "0.5", "--crop-pct", "1")
    assert rep["mean"] == [0.5, 0.5, 0.5] and rep["source"] == "flags --mean, --crop-pct over the model's metadata"
    assert main(["eval", str(m), "--data", str(embedded_val_dir()), "--limit", "8", "-q", "--std", "1", "1", "1"]) == 0
    assert main(["convert", str(m), "--calib", "x", "--std", "0", "1", "1"]) == 2
    assert "--std" in capsys.readouterr().err
