#!/usr/bin/env python
"""Latency and file size: float vs our W8A8 and 4-bit deploys vs onnxruntime's quantize_static W8A8.

    python tools/latency.py --model deit_small_patch16_224 --calib ../shared/data/tin_calib \
        --work /tmp/lat --batches 1 16 --reps 20 --threads 2 --json-out run.json
    python tools/latency.py --table run.json      # the table again, from the run file

For each --model (a timm name, exported with random weights, or a float .onnx) the variants are
built into --work once (reused when present):
  float                 the export
  ours W8A8             convert (uniform, W8A8) + deploy
  ort W8A8              onnxruntime quantize_static (QDQ, per-channel, MinMax; tools/ort_baseline.py)
  ours W4A8 (level N)   convert --recipe mptq --wbits 4 --abits 8 + deploy (MatMulNBits, accuracy_level N);
                        --w4-recipe uniform converts much faster and gives the same graph form
Timing: one plain onnxruntime CPU session per variant (default options, intra_op_num_threads set);
per repetition every variant runs once, the order rotating, so that load drift hits all alike;
median milliseconds per image. Prints a markdown table; the machine's load (uptime) goes with it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort

from mptq_onnx.runtime import make_session  # noqa: E402


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load unknown"


def build_variants(model: str, calib: str, work: Path, calib_size: int, levels: list[int],
                   w4_recipe: str = "mptq", log=print) -> dict[str, Path]:
    from mptq_onnx.cli import main as cli
    from mptq_onnx.data import load_calibration
    from mptq_onnx.modelio import get_preprocess, load_model
    work.mkdir(parents=True, exist_ok=True)
    stem = Path(model).stem if model.endswith(".onnx") else model
    f = Path(model) if model.endswith(".onnx") else work / f"{stem}.onnx"
    v: dict[str, Path] = {"float": f}

    def step(out: Path, argv: list[str]) -> None:
        if not out.exists():
            log(f"building {out.name}: mptq-onnx {' '.join(argv)}")
            if cli(argv) != 0:
                raise SystemExit(f"failed: mptq-onnx {' '.join(argv)}")
    if not f.exists():
        step(f, ["export", model, "-o", str(f), "--no-verify"])
    cs = ["--calib", calib, "--calib-size", str(calib_size), "-q"]
    w8 = work / f"{stem}.w8a8.onnx"
    step(w8, ["convert", str(f), "-o", str(w8), *cs])
    v["ours W8A8"] = work / f"{stem}.w8a8.deploy.onnx"
    step(v["ours W8A8"], ["deploy", str(w8), "-o", str(v["ours W8A8"]), "-q"])
    ort8 = work / f"{stem}.ort_w8a8.onnx"
    if not ort8.exists():
        from tools.ort_baseline import ort_quantize_static
        log(f"building {ort8.name}: quantize_static W8A8 MinMax")
        arr = load_calibration(calib, get_preprocess(load_model(f, load_external=False)), calib_size, progress=False)
        ort_quantize_static(f, arr, ort8, 8, 8, "MinMax")
    v["ort W8A8"] = ort8
    w4 = work / f"{stem}.{w4_recipe}_w4a8.onnx"
    step(w4, ["convert", str(f), "-o", str(w4), "--recipe", w4_recipe, "--wbits", "4", "--abits", "8", *cs])
    for lv in levels:
        out = work / f"{stem}.{w4_recipe}_w4a8.l{lv}.deploy.onnx"
        step(out, ["deploy", str(w4), "-o", str(out), "-q", "--accuracy-level", str(lv)])
        v[f"ours W4A8 (level {lv})"] = out
    return v


def measure(variants: dict[str, Path], batches: list[int], reps: int, threads: int, warmup: int = 2,
            seed: int = 0) -> dict[str, dict[int, list[float]]]:
    """Seconds per run, per variant and batch size, interleaved."""
    sess = {}
    for k, p in variants.items():
        sess[k] = make_session(p, threads=threads, exact_int4=False)  # what a default session runs
    names = list(variants)
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in names}
    rng = np.random.default_rng(seed)
    for b in batches:
        feeds = {}
        for k in names:
            i = sess[k].get_inputs()[0]
            shape = [b] + [d if isinstance(d, int) else 1 for d in i.shape[1:]]
            feeds[k] = {i.name: rng.standard_normal(shape).astype(np.float32)}
        for k in names:
            for _ in range(warmup):
                sess[k].run(None, feeds[k])
        for r in range(reps):
            for j in range(len(names)):
                k = names[(j + r) % len(names)]  # rotate the order each repetition
                t0 = time.perf_counter()
                sess[k].run(None, feeds[k])
                times[k][b].append(time.perf_counter() - t0)
    return times


def table(rows: list[dict], batches: list[int]) -> str:
    head = ["model", "variant", "MB", "size / float"] + [f"ms/img b{b}" for b in batches] + \
        [f"/ float b{b}" for b in batches]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["variant"], f"{r['mb']:.1f}", f"{r['size_ratio']:.3f}"]
        cells += [f"{r['ms_per_image'][str(b)]:.2f}" for b in batches]
        cells += [f"{r['latency_ratio'][str(b)]:.2f}" for b in batches]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", nargs="+", help="timm names or float .onnx files")
    ap.add_argument("--calib", help="calibration images (ImageFolder or .npy)")
    ap.add_argument("--work", help="where the variants are built and kept")
    ap.add_argument("--table", metavar="RUN_JSON", help="only print the table of a run written by --json-out")
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--levels", type=int, nargs="+", default=[4], help="MatMulNBits accuracy levels (default 4)")
    ap.add_argument("--w4-recipe", default="mptq", help="recipe of the W4A8 variant (default mptq)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="intra_op_num_threads (default 2)")
    ap.add_argument("--json-out", help="write the run here")
    a = ap.parse_args(argv)
    if a.table:
        run = json.loads(Path(a.table).read_text())
        print(table(run["rows"], run["batches"]))
        print(f"\n{run['reps']} interleaved repetitions, intra_op_num_threads={run['threads']}, "
              f"onnxruntime {run['onnxruntime']}; {'; '.join(run['load'])}")
        return 0
    if not (a.model and a.calib and a.work):
        ap.error("--model, --calib and --work are required (or --table)")
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    rows, loads = [], [_load()]
    for model in a.model:
        v = build_variants(model, a.calib, Path(a.work), a.calib_size, a.levels, a.w4_recipe, log)
        loads.append(_load())
        t = measure(v, a.batches, a.reps, a.threads)
        loads.append(_load())
        fsize = v["float"].stat().st_size
        fms = {b: statistics.median(t["float"][b]) / b * 1e3 for b in a.batches}
        for k, p in v.items():
            ms = {b: statistics.median(t[k][b]) / b * 1e3 for b in a.batches}
            rows.append({"model": Path(model).stem, "variant": k, "path": str(p), "mb": p.stat().st_size / 1e6,
                         "size_ratio": p.stat().st_size / fsize,
                         "ms_per_image": {str(b): ms[b] for b in a.batches},
                         "latency_ratio": {str(b): ms[b] / fms[b] for b in a.batches},
                         "seconds": {str(b): t[k][b] for b in a.batches}})
    md = table(rows, a.batches)
    print(md)
    print(f"\n{a.reps} interleaved repetitions, intra_op_num_threads={a.threads}, onnxruntime {ort.__version__}; "
          f"{'; '.join(loads)}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"threads": a.threads, "reps": a.reps, "batches": a.batches,
                                                "onnxruntime": ort.__version__, "load": loads, "rows": rows},
                                               indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
