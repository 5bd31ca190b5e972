"""Foreign graphs (issue 27): Hugging Face ViT/DeiT/Swin exported by TorchScript (what optimum
uses) and dynamo, and timm models exported with plain torch.onnx.export, analysed and converted
with the same passes acting as on our own exports."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from mptq_onnx.analyze import analyze
from mptq_onnx.cli import main
from mptq_onnx.embedded import embedded_calib_dir
from mptq_onnx.errors import MptqError
from mptq_onnx.passes.canonicalize import canonicalize_model

pytestmark = pytest.mark.needs_torch

LAYERS = {"vit": 2, "deit": 2, "swin": 4}  # transformer blocks of conftest's hf_dir models


def _roles(path) -> dict[str, int]:
    info = analyze(canonicalize_model(onnx.load(path))[0])
    counts: dict[str, int] = {}
    for s in info.sites:
        counts[s.role] = counts.get(s.role, 0) + 1
    return counts, info


def _convert(src, out, *extra) -> dict:
    assert main(["convert", str(src), "-o", str(out), "--calib", str(embedded_calib_dir()), "--calib-size", "16",
                 "--recipe", "mptq", "--wbits", "4", "--abits", "4", "-q", *extra]) == 0
    return json.loads(out.with_suffix(".report.json").read_text())


def _acted(report) -> dict[str, int]:
    return {p["pass"]: p["sites"] for p in report["passes"] if p["pass"] not in ("calibrate",)}


@pytest.mark.parametrize("family", ["vit", "deit", "swin"])
def test_hf_roles_and_blocks_from_structure(hf_onnx, family):
    """Separate query/key/value Linears are q/k/v (not "linear"), the output projection is proj,
    every block is found, and every LayerNorm group is foldable: on both exporters alike."""
    n = LAYERS[family]
    found = {}
    for exporter in ("torchscript", "dynamo"):
        counts, info = _roles(hf_onnx(family, exporter))
        assert "linear" not in counts, counts
        for r in ("q", "k", "v", "qk", "av", "proj", "fc1", "fc2"):
            assert counts[r] == n, (exporter, r, counts)
        assert counts["head"] == 1 + (family == "deit" and counts["head"] > 1)
        blocks = {s.block for s in info.sites if s.role in ("q", "k", "v", "qk", "av", "proj", "fc1", "fc2")}
        assert len(blocks) == n and None not in blocks
        ln_q = [g for g in info.ln_groups if {info.site(x).role for x in g.sites} == {"q", "k", "v"}]
        assert len(ln_q) == n and all(g.exact for g in info.ln_groups)
        found[exporter] = (counts, len(info.ln_groups), info.family)
    assert found["torchscript"] == found["dynamo"]
    assert found["dynamo"][2] == ("swin" if family == "swin" else "vit")


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_hf_mptq_passes_act_alike_on_both_exporters(hf_onnx, family, tmp_path):
    reps = {e: _convert(hf_onnx(family, e), tmp_path / f"{e}.onnx") for e in ("torchscript", "dynamo")}
    acted = {e: _acted(r) for e, r in reps.items()}
    assert acted["torchscript"] == acted["dynamo"], acted
    a = acted["dynamo"]
    n = LAYERS[family]
    assert a["attn-smooth"] > 0 and a["sq-b"] >= 3 * n  # q, k, v of every block's LayerNorm at least
    assert a["opt-m"] == a["canonicalize"] == a["qdq"]
    for r in reps.values():
        assert r["check"]["top1_agreement"] >= 0.8


def test_timm_plain_torchscript_export_with_shared_initializers(timm_onnx, tmp_path):
    """torch.onnx.export (TorchScript, opset 17) of fresh timm weights replaces repeated initializers
    (zero biases, unit LayerNorm gains) by Identity nodes: mptq crashed there (a bias came out as
    None). It converts now, with the passes acting as on our own export of the same model."""
    import timm
    import torch
    ours = timm_onnx("deit_tiny_patch16_224", img_size=32)
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10).eval()
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    ts = tmp_path / "deit_ts17.onnx"
    with torch.no_grad():
        torch.onnx.export(m, (torch.randn(2, 3, 32, 32),), str(ts), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    g = onnx.load(ts).graph
    inits = {t.name for t in g.initializer}
    assert any(n.op_type == "Identity" and n.input[0] in inits for n in g.node)  # the case under test
    r_ts = _convert(ts, tmp_path / "q_ts.onnx", "--size", "32")
    r_ours = _convert(ours, tmp_path / "q_ours.onnx")
    canon = next(p for p in r_ts["passes"] if p["pass"] == "canonicalize")
    assert "Identity nodes of initializers folded" in canon["summary"]
    a_ts, a_ours = _acted(r_ts), _acted(r_ours)
    a_ours["canonicalize"] -= 0  # same site count, the head's output dims differ only
    assert a_ts["sq-b"] == a_ours["sq-b"] > 0 and a_ts["attn-smooth"] == a_ours["attn-smooth"]


def test_names_lost_roles_and_blocks_stay(hf_onnx, tmp_path):
    """A graph without module paths (dynamo below opset 18; node names only): roles and blocks come
    from the structure, and the passes act on as many sites."""
    m = onnx.load(hf_onnx("vit", "dynamo"))
    for i, n in enumerate(m.graph.node):
        del n.metadata_props[:]
        n.name = f"node_{n.op_type}_{i}"
    bare = tmp_path / "bare.onnx"
    onnx.save(m, bare)
    counts, info = _roles(bare)
    assert "linear" not in counts and counts["q"] == counts["proj"] == counts["fc1"] == 2
    assert {s.block for s in info.sites if s.role == "fc2"} == {"block0", "block1"}
    a = _acted(_convert(bare, tmp_path / "q.onnx"))
    b = _acted(_convert(hf_onnx("vit", "dynamo"), tmp_path / "q_named.onnx"))
    assert a == b


def test_dynamic_height_and_width_take_the_size_from_the_graph_or_the_tensors(hf_onnx, tmp_path, capsys):
    """optimum leaves H and W dynamic: the size comes from the position embedding (32 here, not the
    assumed 224 that failed inside onnxruntime), or from .npy calibration tensors, and it is said."""
    from mptq_onnx.modelio import PREPROCESS_KEY
    m = onnx.load(hf_onnx("vit"))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    keep = [p for p in m.metadata_props if p.key != PREPROCESS_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    src = tmp_path / "dyn.onnx"
    onnx.save(m, src)
    assert main(["convert", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(embedded_calib_dir()),
                 "--calib-size", "16", "-q"]) == 0
    err = capsys.readouterr().err
    assert "32x32 from the position embedding" in err
    rep = json.loads((tmp_path / "q.report.json").read_text())
    assert rep["preprocess"]["input_size"] == [3, 32, 32]
    npy = tmp_path / "calib.npy"
    np.save(npy, np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32))
    assert main(["convert", str(src), "-o", str(tmp_path / "q2.onnx"), "--calib", str(npy), "-q"]) == 0
    assert "32x32 from the calibration tensors" in capsys.readouterr().err
    from mptq_onnx.preprocess import PreprocessOverrides, resolve
    pp, _ = resolve(m, src, PreprocessOverrides(size=48))  # a small --size: no centre crop, as for static inputs
    assert pp.input_size == (3, 48, 48) and pp.crop_pct == 1.0


def test_onnxruntime_fused_transformer_ops_are_refused(hf_onnx):
    m = onnx.load(hf_onnx("vit"))
    ln = next(n for n in m.graph.node if n.op_type == "LayerNormalization")
    ln.op_type, ln.domain = "SkipLayerNormalization", "com.microsoft"
    with pytest.raises(MptqError, match="export without optimization"):
        analyze(m)


def test_hf_reconstruct_runs_block_by_block(hf_onnx, tmp_path):
    """Reconstruction works block by block on a Hugging Face graph (TorchScript, separate q/k/v)."""
    r = _convert(hf_onnx("vit"), tmp_path / "q.onnx", "--reconstruct", "--iters", "2", "--recon-images", "16")
    acted = _acted(r)
    assert acted["reconstruct"] == LAYERS["vit"] + 2  # the blocks, the patch embedding and the head
