"""The reliability table: every bad input tried, what the tool answers, exit code, inputs intact,
nothing partial left. Each case runs the real CLI in a subprocess, in a fresh folder, on the
embedded model (no ../shared, no torch).

    python tools/reliability.py                     # prints the markdown table
    python tools/reliability.py --write docs/reliability.md --json runs/reliability.json

"Inputs intact": the sha256 of every file that existed before the command is unchanged after.
"Nothing partial": no file appeared besides the outputs a successful run announces (model and
report). Takes about 2-4 minutes on 2 idle cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnx import numpy_helper  # noqa: E402

from mptq_onnx.embedded import embedded_calib_dir, embedded_val_dir, load_embedded_model  # noqa: E402
from mptq_onnx.modelio import save_model  # noqa: E402

MARK_BEGIN = "<!-- reliability:begin -->"
MARK_END = "<!-- reliability:end -->"


@dataclasses.dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # builds inputs in the folder, returns the CLI arguments
    expect_rc: int = 2
    timeout: int = 300
    outputs: tuple[str, ...] = ("out.onnx", "out.report.json")  # what a successful run writes


def _model(d: Path, name: str = "model.onnx", edit=None) -> Path:
    m = load_embedded_model()
    if edit:
        edit(m)
    return save_model(m, d / name)


def _set(m, name, fn):
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), name))


def _calib_args(d: Path) -> list[str]:
    return ["--calib", str(embedded_calib_dir()), "--calib-size", "4", "-q"]


def _convert(d: Path, *extra, model_edit=None) -> list[str]:
    return ["convert", str(_model(d, edit=model_edit)), *_calib_args(d), "-o", str(d / "out.onnx"), *extra]


def _nan_weight(m):
    def f(a):
        a.reshape(-1)[0] = np.nan
        return a
    _set(m, "blocks.3.attn.qkv.bias", f)


def _static_batch(m):
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1


def _no_preprocess(m):
    keep = [p for p in m.metadata_props if p.key != "mptq.preprocess"]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)


def _not_4d(m):
    del m.graph.input[0].type.tensor_type.shape.dim[3]


def _decomposed_ln(m):
    sys.path.insert(0, str(REPO / "tests"))
    from test_reliability import decompose_layernorm
    decompose_layernorm(m)


def _folder(d: Path, name: str, n_classes: int, src: Path, link: bool = True) -> Path:
    root = d / name
    root.mkdir()
    for c in sorted(src.iterdir())[:n_classes]:
        if link:
            (root / c.name).symlink_to(c, target_is_directory=True)
        else:
            shutil.copytree(c, root / c.name)
    return root


def _loop_folder(d: Path) -> Path:
    root = _folder(d, "loop", 202, embedded_calib_dir(), link=False)
    first = sorted(root.iterdir())[0]
    (first / "up").symlink_to("..", target_is_directory=True)
    return root


def _bad_images(d: Path) -> Path:
    root = d / "bad"
    (root / "cls").mkdir(parents=True)
    for i in range(3):
        (root / "cls" / f"{i}.jpg").write_bytes(b"not a jpeg")
    return root


def _tiny_not_vit(d: Path) -> Path:
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.ones((3, 4), np.float32), "W")]
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["p"], keepdims=0),
             helper.make_node("MatMul", ["p", "W"], ["logits"])]
    m = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], inits),
                          opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return save_model(m, d / "tiny.onnx")


def _quantized(d: Path) -> Path:
    r = subprocess.run([sys.executable, "-m", "mptq_onnx.cli", *_convert(d)], cwd=REPO, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    (d / "out.report.json").unlink()
    return (d / "out.onnx").rename(d / "quantized.onnx")


CASES = [
    Case("model file missing", lambda d: ["convert", str(d / "nope.onnx"), *_calib_args(d)]),
    Case("model file is not ONNX", lambda d: [
        "convert", str((d / "x.onnx").write_bytes(os.urandom(4096)) and d / "x.onnx"), *_calib_args(d)]),
    Case("ONNX model that is not a ViT", lambda d: ["convert", str(_tiny_not_vit(d)), *_calib_args(d)]),
    Case("model already quantized", lambda d: ["convert", str(_quantized(d)), *_calib_args(d),
                                                "-o", str(d / "again.onnx")]),
    Case("NaN in a weight, --recipe uniform", lambda d: _convert(d, model_edit=_nan_weight)),
    Case("NaN in a weight, --recipe mptq", lambda d: _convert(d, "--recipe", "mptq", model_edit=_nan_weight)),
    Case("image input not 4-D", lambda d: _convert(d, model_edit=_not_4d)),
    Case("static batch of 1 (converts)", lambda d: _convert(d, model_edit=_static_batch), expect_rc=0),
    Case("LayerNorm decomposed, opset < 17 style (converts)", lambda d: _convert(d, model_edit=_decomposed_ln),
         expect_rc=0),
    Case("no preprocessing in the model nor beside it (converts, says what it assumed)",
         lambda d: _convert(d, model_edit=_no_preprocess), expect_rc=0),
    Case("--skip matches nothing", lambda d: _convert(d, "--skip", "haed")),
    Case("--wbits 9", lambda d: _convert(d, "--wbits", "9")),
    Case("calibration .npy of uint8 pixels", lambda d: [
        "convert", str(_model(d)), "--calib", str(_npy(d, np.uint8)), "-o", str(d / "out.onnx"), "-q"]),
    Case("calibration .npy with NaN", lambda d: [
        "convert", str(_model(d)), "--calib", str(_npy(d, np.float32, nan=True)), "-o", str(d / "out.onnx"), "-q"]),
    Case("calibration folder missing", lambda d: [
        "convert", str(_model(d)), "--calib", str(d / "nope"), "-o", str(d / "out.onnx"), "-q"]),
    Case("calibration folder without class folders", lambda d: [
        "convert", str(_model(d)), "--calib", str((d / "empty").mkdir() or d / "empty"), "-o", str(d / "out.onnx")]),
    Case("calibration images all undecodable", lambda d: [
        "convert", str(_model(d)), "--calib", str(_bad_images(d)), "-o", str(d / "out.onnx"), "-q"]),
    Case("calibration folder with a symlink loop (converts)", lambda d: [
        "convert", str(_model(d)), "--calib", str(_loop_folder(d)), "--calib-size", "4", "-o",
        str(d / "out.onnx"), "-q"], expect_rc=0, timeout=180),
    Case("-o is the input model", lambda d: ["convert", str(_model(d)), *_calib_args(d), "-o", str(d / "model.onnx")]),
    Case("-o exists, no --force", lambda d: [
        "convert", str(_model(d)), *_calib_args(d), "-o", str(_model(d, "old.onnx"))]),
    Case("--report is the input model", lambda d: [
        "convert", str(_model(d)), *_calib_args(d), "-o", str(d / "out.onnx"), "--report", str(d / "model.onnx")]),
    Case("--report is the -o path", lambda d: [
        "convert", str(_model(d)), *_calib_args(d), "-o", str(d / "out.onnx"), "--report", str(d / "out.onnx")]),
    Case("--report exists, no --force", lambda d: [
        "convert", str(_model(d)), *_calib_args(d), "-o", str(d / "out.onnx"), "--report",
        str((d / "r.json").write_text("{}") and d / "r.json")]),
    Case("-o under a regular file", lambda d: [
        "convert", str(_model(d)), *_calib_args(d), "-o", str((d / "f").write_text("x") and d / "f" / "out.onnx")]),
    Case("--report in a folder that does not exist (created)", lambda d: [
        "convert", str(_model(d)), *_calib_args(d), "-o", str(d / "out.onnx"), "--report", str(d / "new" / "r.json")],
        expect_rc=0, outputs=("out.onnx", "new/r.json")),
    Case("eval: 5 of the 202 class folders", lambda d: [
        "eval", str(_model(d)), "--data", str(_folder(d, "five", 5, embedded_val_dir())), "-q"]),
    Case("eval: model outputs NaN logits", lambda d: [
        "eval", str(_model(d, edit=lambda m: _set(m, "head.bias", lambda a: a * np.float32(np.nan)))),
        "--data", str(embedded_val_dir()), "--limit", "8", "-q"]),
    Case("--target-bits 2 (below every candidate width)", lambda d: _convert(d, "--recipe", "mptq", "--target-bits", "2")),
    Case("--mp-images without --target-bits", lambda d: _convert(d, "--mp-images", "8")),
    Case("--iters 0 with --reconstruct", lambda d: _convert(d, "--reconstruct", "--iters", "0")),
    Case("--recon-loss without --reconstruct", lambda d: _convert(d, "--recon-loss", "fisher")),
    Case("--act-method with --recipe mptq", lambda d: _convert(d, "--recipe", "mptq", "--act-method", "minmax")),
    Case("--softmax-quantizer with --recipe ias", lambda d: _convert(d, "--recipe", "ias", "--softmax-quantizer",
                                                                      "sulq")),
    Case("--patch-bits without --patchwise", lambda d: _convert(d, "--patch-bits", "3")),
    Case("--max-drop without --val", lambda d: _convert(d, "--recipe", "pmq", "--max-drop", "1")),
    Case("--frontier-plot with --allocator greedy", lambda d: _convert(
        d, "--recipe", "mptq", "--target-bits", "5", "--allocator", "greedy", "--frontier-plot", str(d / "f.png"))),
    Case("eval: static batch of 1 (evaluates)", lambda d: [
        "eval", str(_model(d, edit=_static_batch)), "--data", str(embedded_val_dir()), "--limit", "8", "-q"],
        expect_rc=0),
]


def _npy(d: Path, dtype, nan: bool = False) -> Path:
    rng = np.random.default_rng(0)
    a = (rng.integers(0, 256, (4, 3, 64, 64)) if np.issubdtype(dtype, np.integer)
         else rng.standard_normal((4, 3, 64, 64))).astype(dtype)
    if nan:
        a[0, 0, 0, 0] = np.nan
    np.save(d / "calib.npy", a)
    return d / "calib.npy"


def _snapshot(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.is_symlink() and "loop" not in p.relative_to(d).parts[:1]:
            out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_case(case: Case) -> dict:
    with tempfile.TemporaryDirectory(prefix="mptq_rel_") as tmp:
        d = Path(tmp)
        args = case.setup(d)
        before = _snapshot(d)
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, "-m", "mptq_onnx.cli", *args], cwd=REPO, capture_output=True,
                               text=True, timeout=case.timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
            rc, err = r.returncode, r.stderr
        except subprocess.TimeoutExpired:
            rc, err = None, f"(no answer within {case.timeout} s)"
        secs = time.perf_counter() - t0
        after = _snapshot(d)
        intact = all(after.get(k) == v for k, v in before.items())
        new = sorted(set(after) - set(before))
        expected = set(case.outputs) if rc == 0 else set()
        partial = [n for n in new if n not in expected]
        lines = [ln for ln in err.splitlines() if ln.startswith("mptq-onnx:") or "Traceback" in ln]
        answer = next((ln for ln in lines if "error" in ln), lines[0] if lines else (err.strip().splitlines() or [""])[-1])
        if rc == 0:
            said = [ln.replace("mptq-onnx: ", "") for ln in lines]
            answer = ("converted" if args[0] == "convert" else "evaluated") + (f" ({'; '.join(said)})" if said else "")
        answer = answer.replace(str(d), "DIR")
        return {"case": case.name, "answer": answer.replace("mptq-onnx: error: ", ""), "exit": rc,
                "expected_exit": case.expect_rc, "inputs_intact": intact, "left_behind": partial,
                "traceback": "Traceback" in err, "seconds": round(secs, 1)}


def table(rows: list[dict]) -> str:
    out = ["| bad input | what the tool answers | exit | inputs intact | nothing partial left |",
           "|---|---|---|---|---|"]
    for r in rows:
        ans = r["answer"].replace("|", "\\|")
        if len(ans) > 160:
            ans = ans[:157] + "..."
        ok = "yes" if r["exit"] == r["expected_exit"] and not r["traceback"] else "**no**"
        out.append(f"| {r['case']} | {ans} | {r['exit']} ({ok}) | {'yes' if r['inputs_intact'] else '**no**'} | "
                   f"{'yes' if not r['left_behind'] else '**no**: ' + ', '.join(r['left_behind'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", help="markdown file to update between the reliability markers")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("-k", help="run only cases whose name contains this")
    a = ap.parse_args(argv)
    rows = []
    for case in CASES:
        if a.k and a.k not in case.name:
            continue
        rows.append(run_case(case))
        print(f"{rows[-1]['exit']!s:>4}  {case.name}", file=sys.stderr)
    md = table(rows)
    print(md)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.write:
        p = Path(a.write)
        text = p.read_text() if p.exists() else f"{MARK_BEGIN}\n{MARK_END}\n"
        i, j = text.index(MARK_BEGIN) + len(MARK_BEGIN), text.index(MARK_END)
        p.write_text(text[:i] + "\n" + md + "\n" + text[j:])
    bad = [r for r in rows if r["exit"] != r["expected_exit"] or r["traceback"] or not r["inputs_intact"]
           or r["left_behind"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
