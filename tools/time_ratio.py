"""Conversion time of a recipe against onnxruntime's `quantize_static`, in pairs, one after the other.

    python tools/time_ratio.py --card deit_tiny_tin --config mptq:4 --ort ort:4:MinMax --repeat 5

Both convert the same float model with the same 128 tin_calib images (loaded once, before any
timing). Each pair runs onnxruntime first, then the recipe (including writing the model), and
prints the two times and their ratio; the last line gives the median and the largest ratio.
Nothing is evaluated. Run it on an otherwise idle machine: timings shared with other work mean
nothing. Config syntax: tools/specs.py.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mptq_onnx.calibrate import map_large_allocations  # noqa: E402
from mptq_onnx.convert import convert  # noqa: E402
from mptq_onnx.data import load_calibration  # noqa: E402
from mptq_onnx.modelio import get_preprocess, load_model, save_model  # noqa: E402
from tools.ort_baseline import ort_quantize_static  # noqa: E402
from tools.specs import conversion_config, float_model, pass_times  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", default="deit_tiny_tin")
    ap.add_argument("--config", default="mptq:4")
    ap.add_argument("--ort", default="ort:4:MinMax", help="ort:BITS:MinMax|Percentile")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--work", default=str(REPO / "runs"))
    a = ap.parse_args(argv)
    map_large_allocations()  # as the CLI's process does
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer warns about pre-processing each call
    cfg = conversion_config(a.config)
    _, ort_bits, ort_method = a.ort.split(":")
    float_path = float_model(a.card, Path(a.shared), Path(a.work))
    images = load_calibration(Path(a.shared) / "data" / "tin_calib", get_preprocess(load_model(float_path)),
                              a.calib_size, progress=False)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeat):
            t_ort = ort_quantize_static(float_path, images, Path(tmp) / "ort.onnx", int(ort_bits), int(ort_bits),
                                        ort_method)
            t = time.perf_counter()
            ctx = convert(load_model(float_path), images, cfg, verbose=False)
            save_model(ctx.model, Path(tmp) / "ours.onnx", force=True)
            t_ours = time.perf_counter() - t
            ratios.append(t_ours / t_ort)
            print(f"{i + 1}: {a.ort} {t_ort:.2f} s, {a.config} {t_ours:.2f} s, ratio {ratios[-1]:.2f} "
                  f"({pass_times(ctx.report, 2)})", flush=True)
    print(f"{a.card} {a.config} / {a.ort}, {a.repeat} pairs: median ratio {statistics.median(ratios):.2f}, "
          f"largest {max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
