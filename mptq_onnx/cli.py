"""`mptq-onnx` command line: subcommands mirror the library (export, convert, eval, inspect, demo)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .errors import MptqError


def _bits(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bit-width must be an integer, got {s!r}") from None


def _image_bits(s: str) -> int | None:
    from .plan import parse_image_bits
    try:
        return parse_image_bits(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-bits takes a bit-width or 'abits', got {s!r}") from None


def cmd_export(a) -> int:
    from .exporter import export_model
    export_model(a.name, a.output, pretrained=a.pretrained, checkpoint=a.checkpoint, cards_dir=a.cards_dir,
                 img_size=a.img_size, num_classes=a.num_classes, exporter=a.exporter, force=a.force,
                 verify=not a.no_verify)
    return 0


def default_output(src: Path, cfg) -> Path:
    tag = f"{cfg.recipe}_mp{cfg.target_bits:g}" if cfg.target_bits else f"{cfg.recipe}_w{cfg.wbits}a{cfg.abits}"
    if cfg.max_drop is not None:
        tag = f"{cfg.recipe}_drop{cfg.max_drop:g}"
    return src.with_name(f"{src.stem}.{tag}.onnx")


def run_convert(model_path: Path | None, model, calib, cfg, output: Path, force: bool, report_path: Path | None,
                pp=None, notes: list[str] | None = None):
    """Shared by `convert` and `demo`: convert, save the model and its JSON report. With `model`
    None, convert reads `model_path` itself (and frees the float weights after canonicalizing);
    `pp`: the model's preprocessing, if already read."""
    from .calibrate import map_large_allocations
    from .convert import convert
    from .calibset import open_calibration
    from .modelio import load_model, save_model
    from .outputs import plan_outputs

    rp = report_path or output.with_suffix(".report.json")
    calib_file = Path(calib) if Path(calib).is_file() else None
    # all output paths checked (and missing folders made) before the conversion, not after it
    plot = Path(cfg.frontier_plot) if cfg.frontier_plot else None
    plan = plan_outputs({"input model": model_path, "--calib file": calib_file},
                        {"output": output, "--frontier-plot": plot, "report": rp},
                        force, may_write={"external data": output.with_name(output.name + ".data")})
    src = "the model's metadata"
    notes = [] if notes is None else notes
    if pp is None:
        from .preprocess import resolve
        pp, src = resolve(model if model is not None else load_model(model_path), model_path, log=notes.append)
    elif isinstance(pp, tuple):
        pp, src = pp
    map_large_allocations()  # process-wide, so the CLI's choice and not the library's
    t0 = time.perf_counter()
    images = open_calibration(calib, pp, cfg.calib_size, progress=cfg.progress)  # read batch by batch
    t_load = time.perf_counter() - t0
    recon = None
    if cfg.recon_images is not None and (cfg.reconstruct or cfg.recipe == "ias"):
        recon = open_calibration(calib, pp, cfg.recon_images, progress=cfg.progress,
                                 fewer_ok=cfg.recon_images == RECON_IMAGES_DEFAULT)
    ctx = convert(model if model is not None else model_path, images, cfg, recon_images=recon, preprocess=pp)
    from .modelio import set_preprocess
    from .preprocess import record
    set_preprocess(ctx.model, pp)  # what calibration used travels with the quantized model (eval reads it)
    ctx.report["preprocess"] = record(pp, src)
    with plan.staging() as st:  # the model, then the report, land together at the end of the block
        save_model(ctx.model, output, staging=st)
        report = {"input": str(model_path) if model_path else "embedded:deit_tiny_tin", "output": str(output),
                  "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
                  "image_load_seconds": round(t_load, 3),
                  "total_seconds": round(time.perf_counter() - t0, 3), **ctx.report}
        report.pop("act_sizes", None)
        if plot is not None:
            from .plot import plot_frontier
            st.write_bytes(plot, plot_frontier(ctx.report.get("frontier", []),
                                               f"{model_path.name if model_path else 'embedded'}: {cfg.recipe}, "
                                               f"target {ctx.report['pareto_mp']['target']:g} bits"))
        st.write_bytes(rp, json.dumps(report, indent=1, sort_keys=True, default=float).encode())
    for n in notes:
        print(n, file=sys.stderr)
    print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB) and {rp}", file=sys.stderr)
    return ctx, report


def _given(a) -> set[str]:
    """The convert options the user typed (not left at their defaults)."""
    return getattr(a, "_given", set())


# (option, what it needs, test on the config): an option typed whose need is not met is refused,
# never silently dropped (issue 25)
_NEEDS = [
    (("--mp-candidates", "--mp-images", "--allocator", "--frontier-plot", "--omega-from"),
     "--target-bits or --max-drop", lambda c: c.mixed()),
    (("--val", "--val-size"), "--max-drop", lambda c: c.max_drop is not None),
    (("--iters", "--recon-batch", "--recon-lr", "--recon-scale-lr", "--recon-loss", "--recon-norms", "--recon-rounding",
      "--recon-images",
      "--device"),
     "--reconstruct or --recipe ias", lambda c: c.reconstruct or c.recipe == "ias"),
    (("--patch-keep", "--patch-bits", "--patch-score"), "--patchwise", lambda c: c.patchwise),
    (("--act-method", "--weight-method"), "a recipe with uniform quantizers (uniform, sqb, pmq): the others "
     "choose their own", lambda c: c.recipe in ("uniform", "sqb", "pmq")),
]


def _refuse_unused(cfg, given: set[str]) -> None:
    from .errors import MptqError
    for opts, need, ok in _NEEDS:
        typed = [o for o in opts if o in given]
        if typed and not ok(cfg):
            raise MptqError(f"{', '.join(typed)} {'does' if len(typed) == 1 else 'do'} nothing without {need}")
    if (cfg.reconstruct or cfg.recipe == "ias") and cfg.recon_iters == 0:
        raise MptqError("--iters 0 trains nothing: give --iters 1 or more (or drop --reconstruct)")
    if cfg.recipe == "ias" and "--softmax-quantizer" in given:
        raise MptqError("--recipe ias always quantizes post-Softmax inputs with SULQ: drop --softmax-quantizer")


def _config(a):
    from .plan import QuantConfig
    cfg = QuantConfig(wbits=a.wbits, abits=a.abits, recipe=a.recipe, calib_size=a.calib_size,
                      act_method=a.act_method, weight_method=a.weight_method, target_bits=a.target_bits,
                      seed=a.seed, progress=not a.quiet, skip_sites=tuple(a.skip or ()),
                      image_bits=a.image_bits, mp_images=a.mp_images, weight_rounding=a.weight_rounding,
                      reconstruct=a.reconstruct, recon_iters=a.iters, recon_batch=a.recon_batch, device=a.device,
                      recon_images=a.recon_images, recon_lr=a.recon_lr, recon_scale_lr=a.recon_scale_lr,
                      recon_loss=a.recon_loss, recon_norms=a.recon_norms, recon_rounding=a.recon_rounding,
                      softmax_quantizer=a.softmax_quantizer, allocator=a.allocator,
                      frontier_plot=a.frontier_plot, patchwise=a.patchwise, patch_keep=a.patch_keep,
                      patch_bits=a.patch_bits, patch_score=a.patch_score, max_drop=a.max_drop,
                      val_dir=a.val, val_size=a.val_size, omega_from=a.omega_from,
                      providers=tuple(a.providers), threads=a.threads)
    if a.mp_candidates:
        cfg.mp_candidates = tuple(a.mp_candidates)
    cfg.validate()
    _refuse_unused(cfg, _given(a))
    return cfg


def _add_runtime_args(p):
    p.add_argument("--providers", nargs="+", default=["cpu"], metavar="EP",
                   help="onnxruntime execution providers in order: cpu (default), cuda (onnxruntime-gpu), "
                        "tensorrt, dml, openvino, ... or full names; the CPU is always the fallback")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads, and torch's while reconstructing (default: one per core)")


def _overrides(a):
    from .preprocess import PreprocessOverrides
    o = PreprocessOverrides(mean=tuple(a.mean) if a.mean else None, std=tuple(a.std) if a.std else None,
                            size=a.size, crop_pct=a.crop_pct, interpolation=a.interpolation)
    o.validate()
    return o


def cmd_convert(a) -> int:
    from .modelio import load_model
    from .preprocess import resolve
    cfg = _config(a)
    src = Path(a.model)
    # a bad file fails first, before any note on its preprocessing; convert reads the model again
    # and owns it
    notes: list[str] = []  # said after the conversion, so that a bad input gets one error line only
    pp = resolve(load_model(src), src, _overrides(a), log=notes.append, calib=a.calib)
    out = Path(a.output) if a.output else default_output(src, cfg)
    if a.calib is None:
        raise MptqError("--calib is required: an image folder or an .npy/.npz of preprocessed images")
    run_convert(src, None, a.calib, cfg, out, a.force, Path(a.report) if a.report else None, pp=pp, notes=notes)
    return 0


def cmd_eval(a) -> int:
    from .evaluator import evaluate
    from .runtime import check_threads, parse_providers
    res = evaluate(a.model, a.data, batch_size=a.batch_size, limit=a.limit, progress=not a.quiet and not a.json,
                   overrides=_overrides(a), threads=check_threads(a.threads), providers=parse_providers(a.providers))  # the model is read once, its preprocessing resolved as convert does
    if a.json:
        print(json.dumps(res.to_dict(), sort_keys=True))
    else:
        t5 = "n/a" if res.top5 is None else f"{res.top5:.4f}"  # fewer than 5 classes
        print(f"top-1 {res.top1:.4f}  top-5 {t5}  on {res.images} images  ({res.images_per_s:.1f} images/s)")
    return 0


def cmd_inspect(a) -> int:
    from .inspect import inspect_model
    print(inspect_model(a.model))
    if a.netron:
        try:
            import netron
        except ImportError:
            raise MptqError("--netron needs the netron package: pip install netron") from None
        netron.start(str(a.model), browse=False)
        print("serving in Netron; Ctrl-C to stop", file=sys.stderr)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_demo(a) -> int:
    """Convert the embedded deit_tiny_tin on its embedded images and compare it with float."""
    from .embedded import embedded_calib_dir, embedded_val_dir, load_embedded_model
    from .evaluator import evaluate
    from .preprocess import resolve
    cfg = _config(a)
    model = load_embedded_model()
    pp = resolve(model, None, _overrides(a))  # the embedded model's own, unless flags say otherwise
    out_dir = Path(a.out_dir) if a.out_dir else Path(tempfile.mkdtemp(prefix="mptq_demo_"))
    out = out_dir / (default_output(Path("deit_tiny_tin.onnx"), cfg).name)
    run_convert(None, model, embedded_calib_dir(), cfg, out, a.force or not a.out_dir, None, pp=pp)
    val = embedded_val_dir()
    rt = {"threads": cfg.threads, "providers": cfg.providers}
    f = evaluate(model, val, progress=not a.quiet, preprocess=pp[0], **rt)
    q = evaluate(out, val, progress=not a.quiet, preprocess=pp[0], **rt)
    print(f"\nembedded deit_tiny_tin, {f.images} val images ({val})")
    print(f"  float32            top-1 {f.top1:.4f}  top-5 {f.top5:.4f}")
    print(f"  {out.stem.split('.', 1)[1]:<18} top-1 {q.top1:.4f}  top-5 {q.top5:.4f}")
    print(f"  quantized model: {out}")
    return 0


def cmd_deploy(a) -> int:
    from .deployer import DeployConfig, deploy_file, report_path
    cfg = DeployConfig(w4=a.w4, accuracy_level=a.accuracy_level, block_size=a.block_size, verify=not a.no_verify)
    rep = deploy_file(a.model, a.output, cfg, force=a.force)
    if not a.quiet:
        print(rep.table(), file=sys.stderr)
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    out = Path(rep.output)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {report_path(out)}", file=sys.stderr)
    return 0


RECON_IMAGES_DEFAULT = 512  # on deit_tiny_tin, reconstruction on 128 images did not lower the KL of held-out images


def _add_preprocess_args(p):
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar="M",
                   help="preprocessing: per-channel mean (default: the model's metadata, else a preprocessor_config.json "
                        "beside it, else ImageNet's, said in one line)")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar="S", help="preprocessing: per-channel std")
    p.add_argument("--size", type=int, default=None, help="preprocessing: input height = width in pixels")
    p.add_argument("--crop-pct", type=float, default=None, help="preprocessing: center-crop fraction (1: no crop)")
    p.add_argument("--interpolation", default=None, help="preprocessing: bicubic | bilinear | nearest | ...")


def _add_quant_args(p):
    from .plan import RECON_LOSSES, RECON_ROUNDINGS
    p.add_argument("--recipe", default="uniform",
                   help="uniform | mptq | mptq-paper | sqb | optm | ias | pmq (default: uniform); see the README's recipe "
                        "table (ias: I&S-ViT, trains in torch; pmq: PMQ's allocation over uniform quantizers, "
                        "needs --target-bits)")
    p.add_argument("--wbits", type=_bits, default=8, help="weight bits, 2-8 (default 8)")
    p.add_argument("--abits", type=_bits, default=8, help="activation bits, 2-8 (default 8)")
    p.add_argument("--target-bits", type=float, default=None,
                   help="mixed precision: average bit-width for weights and activations (e.g. 5)")
    p.add_argument("--allocator", choices=["pareto", "greedy"], default="pareto",
                   help="mixed precision: pareto (PMQ: one-shot sensitivity and the whole Pareto frontier, kept in "
                        "the report; default) or greedy (MPTQ-ViT's Greedy MP)")
    p.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                   help="instead of --target-bits: the smallest model on PMQ's frontier whose top-1 on --val is "
                        "within POINTS points of float (bisection, a few evaluations)")
    p.add_argument("--val", default=None, metavar="DIR", help="--max-drop: labelled images (ImageFolder)")
    p.add_argument("--val-size", type=int, default=1000, help="--max-drop: images of --val used (default 1000)")
    p.add_argument("--omega-from", metavar="REPORT", default=None,
                   help="--allocator pareto: reuse the sensitivity (Ω) in the report of an earlier conversion of the "
                        "same model and recipe, so another --target-bits costs no new measurement")
    p.add_argument("--frontier-plot", metavar="PNG", default=None,
                   help="--allocator pareto: draw the frontier, the chosen point and the measured KL at every whole "
                        "bit into this PNG (needs matplotlib: the plot extra)")
    p.add_argument("--patchwise", action="store_true",
                   help="PMQ's patch-wise bits: in each attention·V MatMul, the key tokens with the least attention "
                        "mass take --patch-bits, chosen in the graph per image")
    p.add_argument("--patch-keep", type=float, default=0.5,
                   help="--patchwise: share of the tokens that keep the site's width (default 0.5; 0 lowers them all)")
    p.add_argument("--patch-bits", type=_bits, default=2, help="--patchwise: the other tokens' width (default 2)")
    p.add_argument("--patch-score", choices=["mass", "cls"], default="mass",
                   help="--patchwise: rank tokens by attention mass (mean over heads and queries; default) or by "
                        "the class token's attention (ViT/DeiT)")
    p.add_argument("--mp-candidates", type=_bits, nargs="+", default=None,
                   help="mixed-precision bit-widths (default 8 6 5 4, and 3 for a target below 5)")
    p.add_argument("--mp-images", type=int, default=16,
                   help="calibration images Greedy MP scores configurations on (default 16; time grows with it)")
    p.add_argument("--image-bits", type=_image_bits, default=8,
                   help="bits of the image input of the first layer (default 8: pixels are 8-bit data; RepQ-ViT "
                        "quantizes it at 8 bits, I&S-ViT not at all); 'abits' quantizes it like every activation")
    p.add_argument("--calib-size", type=int, default=128, help="calibration images (default 128)")
    p.add_argument("--act-method", default="mse", help="uniform recipe: minmax | mse (default mse)")
    p.add_argument("--weight-method", default="mse", help="uniform recipe: minmax | mse (default mse)")
    p.add_argument("--weight-rounding", choices=["nearest", "gptq"], default=None,
                   help="weight rounding after the scales are chosen: nearest, or gptq (error compensation "
                        "through the layer's input Hessian; needs opt-m). Default: gptq in mptq, else nearest")
    p.add_argument("--softmax-quantizer", choices=["default", "sulq"], default="default",
                   help="post-Softmax inputs: the recipe's choice, or SULQ (I&S-ViT) on all of them")
    p.add_argument("--reconstruct", action="store_true",
                   help="block reconstruction: train each block's weights through its quantizers (needs torch)")
    p.add_argument("--iters", type=int, default=None,
                   help="--reconstruct and --recipe ias: iterations per block and stage (default 100; 500 with "
                        "--recon-rounding learned)")
    p.add_argument("--recon-batch", type=int, default=32,
                   help="--reconstruct and --recipe ias: images per iteration (default 32)")
    p.add_argument("--recon-lr", type=float, default=3e-4,
                   help="--reconstruct and --recipe ias: Adam learning rate, cosine decay (default 3e-4; "
                        "I&S-ViT's own protocol: 4e-5 with --iters 1000 --recon-batch 64)")
    p.add_argument("--recon-scale-lr", type=float, default=3e-3,
                   help="--reconstruct and --recipe ias: learning rate of the activation quantizers' scales "
                        "(uniform and region, trained with the weights, LSQ); 0 keeps them as calibrated (default 3e-3)")
    p.add_argument("--recon-loss", choices=("default",) + RECON_LOSSES, default="default",
                   help="--reconstruct and --recipe ias: how a block's output error is weighted: mse (alike, as "
                        "I&S-ViT), or by the gradient of the float model's loss there: fisher (squared, per image, "
                        "BRECQ), fisher_mean (squared, averaged over the images), fisher_abs (magnitude, averaged), "
                        "fisher_kl (of the KL to float with the block quantized, as FIMA-Q), fisher_dplr (fisher_abs plus "
                        "FIMA-Q's rank-one term). default: fisher_abs "
                        "after a recipe (lowest held-out KL on deit and swin), mse in --recipe ias")
    p.add_argument("--recon-norms", action="store_true",
                   help="--reconstruct and --recipe ias: train the LayerNorms' scale and shift before quantized "
                        "inputs with the weights (lower held-out KL at W3A3, higher at W4A4; results.md)")
    p.add_argument("--recon-rounding", choices=RECON_ROUNDINGS, default="ste",
                   help="--reconstruct and --recipe ias: ste trains the weights; learned trains each weight's "
                        "rounding (AdaRound, from nearest or --weight-rounding gptq; 500 --iters unless given; at W3A3 lower held-out "
                        "KL, tin_val_dev within noise; at W4A4 higher KL: results.md) (default ste)")
    p.add_argument("--recon-images", type=int, default=RECON_IMAGES_DEFAULT,
                   help=f"--reconstruct and --recipe ias: images to train on, from --calib (default "
                        f"{RECON_IMAGES_DEFAULT}, or all it holds; the searches keep --calib-size)")
    p.add_argument("--device", default="cpu", help="--reconstruct and --recipe ias: cpu | cuda (default cpu)")
    p.add_argument("--skip", nargs="+", help="site names or roles to leave in float (e.g. head; names as in inspect)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration row samples and the searches' subsamples (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or pass log")


_EXAMPLES = {
    "mptq-onnx": """example:
  mptq-onnx export deit_tiny_patch16_224 -o deit.onnx
  mptq-onnx convert deit.onnx --calib calib_images/ --recipe mptq --wbits 4 --abits 4 -o deit.w4a4.onnx
  mptq-onnx eval deit.w4a4.onnx --data val_images/
run 'mptq-onnx COMMAND -h' for each command's options and examples""",
    "export": """examples:
  mptq-onnx export deit_tiny_patch16_224 -o deit.onnx                 # timm model, random weights
  mptq-onnx export vit_base_patch16_224 --checkpoint vit.safetensors -o vit.onnx
  mptq-onnx export ../shared/models/deit_tiny_tin.json -o deit_tin.onnx   # a model card
  mptq-onnx export ./my-vit/ -o my_vit.onnx        # a transformers save_pretrained folder (ViT, DeiT, Swin)""",
    "convert": """examples:
  mptq-onnx convert deit.onnx --calib calib_images/ --recipe mptq --wbits 4 --abits 4 -o deit.w4a4.onnx
  mptq-onnx convert deit.onnx --calib calib_images/ --recipe mptq --target-bits 5   # Greedy MP
  mptq-onnx convert deit.onnx --calib calib_images/ --recipe ias --wbits 4 --abits 4  # I&S-ViT (torch)
  mptq-onnx convert deit.onnx --calib calib.npy                                      # uniform W8A8""",
    "eval": """examples:
  mptq-onnx eval deit.w4a4.onnx --data val_images/
  mptq-onnx eval deit.w4a4.onnx --data val_images/ --limit 500 --json""",
    "inspect": """examples:
  mptq-onnx inspect deit.w4a4.onnx
  mptq-onnx inspect deit.w4a4.onnx --netron""",
    "deploy": """examples:
  mptq-onnx deploy deit.mptq_w4a8.onnx -o deit.w4a8.deploy.onnx
  mptq-onnx deploy deit.mptq_w4a8.onnx --accuracy-level 1    # 4-bit weights, float32 arithmetic
prints a per-layer table (form, kernel onnxruntime chose) and writes <output>.report.json""",
    "demo": """examples:
  mptq-onnx demo --recipe mptq --wbits 4 --abits 4
  mptq-onnx demo --recipe mptq --target-bits 5 --out-dir demo_out/""",
}


def _help(cmd: str) -> dict:
    """A subcommand's example epilog, kept verbatim by the formatter."""
    return {"epilog": _EXAMPLES[cmd], "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mptq-onnx", description=__doc__, epilog=_EXAMPLES["mptq-onnx"],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("export", help="export a timm model, a model card or a Hugging Face folder to ONNX",
                       **_help("export"))
    p.add_argument("name", help="timm model name, model card name, card .json path, or a Hugging Face "
                                "save_pretrained folder (needs the hf extra)")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs network)")
    p.add_argument("--checkpoint", help="state dict to load (.safetensors, .pth)")
    p.add_argument("--cards-dir", help="where to look for model cards (default: the repo's models/cards, then ../shared/models)")
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's or card's own)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's or card's own)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"],
                   help="torch.onnx exporter (default dynamo)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("convert", help="quantize an ONNX ViT (writes QDQ ONNX and a JSON report)", **_help("convert"))
    p.add_argument("model", help="float ONNX model (from mptq-onnx export)")
    p.add_argument("--calib", help="calibration images: ImageFolder dir or .npy/.npz")
    p.add_argument("-o", "--output", help="default: beside the input, with a suffix")
    p.add_argument("--report", help="JSON report path (default: <output>.report.json)")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    _add_quant_args(p)
    _add_preprocess_args(p)
    _add_runtime_args(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("eval", help="top-1/top-5 of an ONNX classifier on an ImageFolder", **_help("eval"))
    p.add_argument("model", help="ONNX model, float or quantized")
    p.add_argument("--data", required=True, help="ImageFolder: one subfolder of images per class")
    p.add_argument("--limit", type=int, help="evaluate an evenly spread subset of this many images")
    p.add_argument("--batch-size", type=int, default=64, help="images per onnxruntime run (default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_preprocess_args(p)
    _add_runtime_args(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("inspect", help="per-layer table of a (quantized) model", **_help("inspect"))
    p.add_argument("model", help="ONNX model, float or quantized")
    p.add_argument("--netron", action="store_true", help="serve it in Netron (pip install netron)")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("deploy", help="lower a converted model to onnxruntime's integer and 4-bit kernels",
                       **_help("deploy"))
    p.add_argument("model", help="a model written by `mptq-onnx convert`")
    p.add_argument("-o", "--output", help="default: <model>.deploy.onnx beside the input")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.add_argument("--w4", choices=["nbits", "int8"], default="nbits",
                   help="4-bit weights: MatMulNBits (default, 4-bit file) or int8 integer kernels (exact, 8-bit file)")
    from .deployer import ACCURACY_LEVELS
    p.add_argument("--accuracy-level", type=int, default=4, choices=list(ACCURACY_LEVELS),
                   help="MatMulNBits accuracy_level: 4 (default) int8 input blocks, fast, not the simulation's "
                        "arithmetic; 1 float32, exact")
    p.add_argument("--block-size", type=int, default=0, help="MatMulNBits block size (default: largest of 128..16 dividing K)")
    p.add_argument("--no-verify", action="store_true", help="skip reading back onnxruntime's optimized graph")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-layer table")
    p.set_defaults(fn=cmd_deploy)

    p = sub.add_parser("demo", help="convert and evaluate the embedded deit_tiny_tin (no data or network needed)",
                       **_help("demo"))
    p.add_argument("--out-dir", help="where to write the quantized model (default: a temp dir)")
    p.add_argument("--force", action="store_true", help="overwrite the model and report in --out-dir")
    _add_quant_args(p)
    _add_preprocess_args(p)
    _add_runtime_args(p)
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {t.split("=", 1)[0] for t in argv if t.startswith("--")}
    args._given = flags
    try:
        return args.fn(args)
    except MptqError as e:
        print(f"mptq-onnx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mptq-onnx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, as Unix tools do; stdout is pointed at
        # devnull so that Python's own flush at exit does not raise a second time
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a tool ended by a broken pipe


if __name__ == "__main__":
    sys.exit(main())
