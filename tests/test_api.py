"""The Python API (mptq_onnx.quantize, evaluate, deploy): the README's example runs, and quantize
writes what `mptq-onnx convert` writes for the same options."""
import json
import re
from pathlib import Path

import pytest

import mptq_onnx
from mptq_onnx.cli import main
from mptq_onnx.embedded import embedded_calib_dir, embedded_val_dir
from mptq_onnx.errors import MptqError

REPO = Path(__file__).resolve().parents[1]
_VARYING = ("seconds", "total_seconds", "image_load_seconds", "output", "metric_seconds", "frontier_seconds")


def _stable(rep: dict) -> dict:
    """The report without what differs between two runs (times, the output path)."""
    if isinstance(rep, dict):
        return {k: _stable(v) for k, v in rep.items() if k not in _VARYING}
    if isinstance(rep, list):
        return [_stable(v) for v in rep]
    return rep


def test_readme_python_example_runs(embedded_onnx, tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    code = (code.replace('"deit_s.onnx"', repr(str(embedded_onnx)))
                .replace('"calib_images/"', repr(str(embedded_calib_dir())))
                .replace('"val_images/"', repr(str(embedded_val_dir()))))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "deit_s.w4a4.onnx").exists() and (tmp_path / "deit_s.w4a4.deploy.onnx").exists()


def test_quantize_writes_what_convert_writes(embedded_onnx, tmp_path):
    opts = dict(recipe="uniform", wbits=4, abits=6, calib_size=8, progress=False)
    res = mptq_onnx.quantize(embedded_onnx, embedded_calib_dir(), tmp_path / "api.onnx", **opts)
    assert main(["convert", str(embedded_onnx), "--calib", str(embedded_calib_dir()), "--recipe", "uniform",
                 "--wbits", "4", "--abits", "6", "--calib-size", "8", "-q", "-o", str(tmp_path / "cli.onnx")]) == 0
    cli_rep = json.loads((tmp_path / "cli.report.json").read_text())
    assert _stable(res.report) == _stable(cli_rep)
    assert res.report == json.loads(res.report_path.read_text())
    assert (tmp_path / "api.onnx").read_bytes() == (tmp_path / "cli.onnx").read_bytes()
    assert res.check == res.report["check"] and res.report["config"]["recon_images"] == 512  # the CLI's default


def test_api_refuses_what_the_cli_refuses(embedded_onnx, tmp_path):
    with pytest.raises(MptqError, match="unknown option 'wbit'"):
        mptq_onnx.quantize(embedded_onnx, embedded_calib_dir(), tmp_path / "q.onnx", wbit=4)
    with pytest.raises(MptqError, match="--target-bits"):
        mptq_onnx.quantize(embedded_onnx, embedded_calib_dir(), tmp_path / "q.onnx", mp_images=8)
    assert not (tmp_path / "q.onnx").exists()
    assert isinstance(mptq_onnx.__version__, str) and mptq_onnx.__version__[0].isdigit()


def test_api_names_survive_importing_every_module():
    """The API's functions are not shadowed by submodules of the same name (evaluator, deployer and
    exporter are named apart from evaluate, deploy and export for that)."""
    import importlib
    import pkgutil
    for m in pkgutil.iter_modules(mptq_onnx.__path__):
        if m.name != "__main__":
            importlib.import_module(f"mptq_onnx.{m.name}")
    for name in ("quantize", "evaluate", "deploy", "export"):
        assert callable(getattr(mptq_onnx, name)) and getattr(mptq_onnx, name).__module__ == "mptq_onnx.api"
