"""Session-wide fixtures: exported float32 ONNX models (each exported once per session) and paths.

* ``repo_root``: the checkout's root.
* ``shared_dir``: ``<repo>/../shared`` (reference models and data); skips when absent.
* ``timm_onnx(name, img_size=None) -> Path``: a random-weight timm model (seed 0) exported to
  ONNX (opset 21, dynamic batch), cached by arguments; skips without torch/timm.
* ``deit_tin_onnx`` / ``swin_tin_onnx``: float32 exports of the shared model cards.
* ``embedded_onnx``: the embedded deit_tiny_tin model (float32) written to a file; needs no torch.
* ``model`` / ``calib``: the embedded model and 32 of its calibration images, once per test module
  (a module may define its own ``model`` instead).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _need_torch():
    pytest.importorskip("torch", reason="needs the export extra (torch)")
    pytest.importorskip("timm", reason="needs the export extra (timm)")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir(repo_root) -> Path:
    d = repo_root.parent / "shared"
    if not (d / "models").is_dir() or not (d / "data").is_dir():
        pytest.skip(f"shared models/data not found at {d}")
    return d


@pytest.fixture(scope="session")
def timm_onnx(tmp_path_factory):
    """Factory: timm_onnx(name, img_size=None) -> Path of its float32 ONNX export (random weights)."""
    cache: dict[tuple, Path] = {}
    out_dir = tmp_path_factory.mktemp("timm_onnx")

    def make(name: str, img_size=None) -> Path:
        key = (name, img_size if not isinstance(img_size, list) else tuple(img_size))
        if key not in cache:
            _need_torch()
            import torch

            from mptq_onnx.exporter import export_model

            torch.manual_seed(0)  # export_model also seeds (seed=0) in a forked RNG
            suffix = f"_{img_size}" if img_size is not None else ""
            cache[key] = export_model(name, out_dir / f"{name}{suffix}.onnx", img_size=img_size,
                                      verify=False, log=None)
        return cache[key]

    return make


def _card_export(shared_dir: Path, out_dir: Path, name: str) -> Path:
    _need_torch()
    from mptq_onnx.exporter import export_model

    card = shared_dir / "models" / f"{name}.json"
    if not card.is_file():
        pytest.skip(f"{card} not found")
    return export_model(str(card), out_dir / f"{name}.onnx", verify=True, log=None)


@pytest.fixture(scope="session")
def deit_tin_onnx(shared_dir, tmp_path_factory) -> Path:
    return _card_export(shared_dir, tmp_path_factory.mktemp("cards"), "deit_tiny_tin")


@pytest.fixture(scope="session")
def swin_tin_onnx(shared_dir, tmp_path_factory) -> Path:
    return _card_export(shared_dir, tmp_path_factory.mktemp("cards"), "swin_tiny_tin")


@pytest.fixture(scope="session")
def embedded_onnx(tmp_path_factory) -> Path:
    from mptq_onnx.embedded import load_embedded_model
    from mptq_onnx.modelio import save_model

    return save_model(load_embedded_model(), tmp_path_factory.mktemp("embedded") / "deit_tiny_tin.onnx")


@pytest.fixture(scope="module")
def model():
    from mptq_onnx.embedded import load_embedded_model

    return load_embedded_model()


@pytest.fixture(scope="module")
def calib(model):
    from mptq_onnx.data import load_calibration
    from mptq_onnx.embedded import embedded_calib_dir
    from mptq_onnx.modelio import get_preprocess

    return load_calibration(embedded_calib_dir(), get_preprocess(model), 32, progress=False)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """Factory: hf_dir(family) -> a small random save_pretrained folder (tools/foreign.make_hf_dir), made once."""
    cache: dict[str, Path] = {}
    out = tmp_path_factory.mktemp("hf")

    def make(family: str) -> Path:
        if family not in cache:
            _need_torch()
            pytest.importorskip("transformers", reason="needs the hf extra (transformers)")
            from tools.foreign import make_hf_dir
            cache[family] = make_hf_dir(family, out)
        return cache[family]

    return make


@pytest.fixture(scope="session")
def hf_onnx(hf_dir, tmp_path_factory):
    """Factory: hf_onnx(family, exporter) -> `mptq-onnx export` of hf_dir(family), verified against torch."""
    cache: dict[tuple, Path] = {}
    out = tmp_path_factory.mktemp("hf_onnx")

    def make(family: str, exporter: str = "torchscript") -> Path:
        key = (family, exporter)
        if key not in cache:
            from mptq_onnx.exporter import export_model
            cache[key] = export_model(str(hf_dir(family)), out / f"{family}_{exporter}.onnx", exporter=exporter,
                                      verify=True, log=None)
        return cache[key]

    return make
