"""PMQ's bit allocation (Xiao et al., 2023): global sensitivity, then the Pareto frontier.

Runs where Greedy MP would (the default allocator; --allocator greedy for Greedy MP), on the same quantizers (the recipe's own: OPT-m's
in `mptq`, the uniform ones in `pmq`), budgets and candidates. Ω comes from sensitivity.py in a
fixed number of forward passes; frontier.py turns it into the least-Ω allocation at every
average width, and --target-bits reads one point off it. The report keeps the frontier (a point
every quarter bit) so a user sees the whole trade-off from one run.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from ..errors import MptqError
from ..frontier import solve
from ..plan import Context
from ..sensitivity import Item, Sensitivity, global_sensitivity
from ..simulate import kl_divergence
from .base import Pass, PassResult
from .greedy_mp import UniformProvider, apply_widths, budget_shares, build_simulator, slot_feeds


def site_macs(ctx: Context) -> dict[str, float]:
    """Multiply-accumulates per image of each site, from the calibrated tensor sizes: a Linear's
    input elements x its outputs, a Conv's the same x kernel area / stride area, an activation
    MatMul's first operand's elements x the second's last axis."""
    sizes = ctx.report["act_sizes"]
    nodes = {n.name: n for n in ctx.model.graph.node}
    out = {}
    for p in ctx.plan.values():
        s = p.site
        a0 = sizes.get(s.inputs[0].tensor, 0.0) if s.inputs else 0.0
        if s.weight:
            shape = ctx.initializer(s.weight).dims
            macs = a0 * shape[s.w_out_axis]
            n = nodes.get(s.node)
            if n is not None and n.op_type == "Conv":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                kernel = float(np.prod(shape[2:]))
                stride = float(np.prod(attrs.get("strides", [1] * (len(shape) - 2))))
                macs = a0 * shape[0] * kernel / stride / max(int(attrs.get("group", 1)), 1)
            out[s.name] = float(macs)
        else:
            st = ctx.calib.stats.get(s.inputs[1].tensor) if len(s.inputs) > 1 else None
            last = st.sample.shape[-1] if st is not None and st.sample is not None else 0
            out[s.name] = float(a0 * last)
    return out


def gbops(plan, macs: dict[str, float], w_bits: dict[str, int] | None = None,
          a_bits: dict[str, int] | None = None) -> float:
    """Giga bit-operations per image: Σ MACs x weight bits x activation bits (activation x
    activation for attention MatMuls); a float operand counts 32 bits."""
    tot = 0.0
    for p in plan.values():
        s = p.site
        ab = (a_bits or {}).get(s.name, p.a_bits) or 32
        wb = ((w_bits or {}).get(s.name, p.w_bits) or 32) if s.weight else ab
        tot += macs.get(s.name, 0.0) * wb * ab
    return tot / 1e9


def allocation_items(ctx: Context) -> tuple[list[Item], dict, dict]:
    """The quantizers an allocator moves, with every quantizer's budget share and the held ones
    (greedy_mp.budget_shares)."""
    share, fixed = budget_shares(ctx)
    sites = {p.site.name: p.site for p in ctx.plan.values()}
    return [Item(k, sites[k[0]], v) for k, v in share.items() if k not in fixed], share, fixed


def load_omega(path, items, cands) -> Sensitivity:
    """Ω from the report of an earlier conversion of the same model and recipe (--omega-from)."""
    t0 = time.perf_counter()
    try:
        rep = json.loads(Path(path).read_text())
        mp = rep["pareto_mp"]
        raw = mp["omega"]
    except (OSError, ValueError, KeyError, TypeError):
        raise MptqError(f"--omega-from {path}: not the report of a conversion with PMQ's allocator "
                        "(no pareto_mp.omega)") from None
    want = {f"{it.key[0]}:{it.key[1]}" for it in items}
    if set(raw) != want:
        extra, missing = sorted(set(raw) - want), sorted(want - set(raw))
        raise MptqError(f"--omega-from {path}: its quantizers are not this model's "
                        f"({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} unknown, e.g. {extra[:1]}): "
                        "use the report of the same model and recipe")
    if not set(map(str, cands)) <= set(next(iter(raw.values()), {})):
        raise MptqError(f"--omega-from {path}: it scored widths {sorted(next(iter(raw.values())))}, not all of "
                        f"{sorted(cands)}: give the same --mp-candidates")
    omega = {(it.key[0], it.key[1]): {b: float(raw[f'{it.key[0]}:{it.key[1]}'][str(b)]) for b in cands}
             for it in items}
    return Sensitivity(omega, int(mp.get("probe_bits", min(cands))), 0, 0, time.perf_counter() - t0,
                       float(mp.get("fit_r2", float("nan"))))


def model_gbops(ctx: Context) -> float:
    """GBOPs per image of the plan as written (patch-wise attention·V sites at their mixed widths)."""
    from .patchwise import patch_gbops
    macs = site_macs(ctx)
    tot = gbops({n: p for n, p in ctx.plan.items() if p.patch is None}, macs)
    for p in ctx.plan.values():
        if p.patch is not None:
            tot += patch_gbops(p.patch, macs.get(p.site.name, 0.0), p.a_bits)
    return tot


class ParetoMP(Pass):
    name = "pareto-mp"

    def __call__(self, ctx: Context) -> PassResult:
        cfg = ctx.config
        target = cfg.target_bits
        if target is None and cfg.max_drop is None:
            return PassResult(ctx, False, "no --target-bits: skipped")
        cands = sorted(set(cfg.candidates()), reverse=True)
        prov = ctx.site_optimizer or UniformProvider(ctx)
        plans = list(ctx.plan.values())
        sites = {p.site.name: p.site for p in plans}
        items, share, fixed = allocation_items(ctx)
        probe = cfg.pmq_probe_bits or min(cands)
        imgs = ctx.calib_images[: cfg.mp_images]
        ref = ctx.calib.logits[: cfg.mp_images]
        if cfg.omega_from:  # a previous run's Ω: this run only reads the frontier again
            sens = load_omega(cfg.omega_from, items, cands)
        else:
            sens = global_sensitivity(ctx, prov, items, cands, probe, imgs, ref, cfg.pmq_masks,
                                      progress=cfg.progress)

        t1 = time.perf_counter()
        asc = sorted(cands)
        fr = {}
        for typ in ("w", "a"):
            its = [it for it in items if it.key[1] == typ]
            if not its:
                fr[typ] = None
                continue
            held = sum(share[k] * b for k, b in fixed.items() if k[1] == typ)
            # a held quantizer's bits count in the average: the movable ones meet what is left
            om = np.array([[sens.omega[it.key][b] for b in asc] for it in its])
            fr[typ] = (solve(asc, np.array([it.share for it in its]), om), its, held)
        t_frontier = time.perf_counter() - t1

        # the lowest average each type reaches (held quantizers count at their width)
        floor_avg = max([fr[t][2] + sum(it.share for it in fr[t][1]) * min(cands) for t in fr if fr[t] is not None]
                        or [min(cands)])
        if target is not None and target < floor_avg - 1e-9:
            raise MptqError(f"--target-bits {target:g} cannot be met: with the inputs held at --image-bits, the "
                            f"lowest reachable average is {floor_avg:.3f} bits")
        grid_lo = float(np.ceil(floor_avg * 4 - 1e-9) / 4)

        def pick(typ, t):
            if fr[typ] is None:
                return {}
            f, its, held = fr[typ]
            idx = f.at(t - held)
            return {it.key: asc[j] for it, j in zip(its, idx)}

        macs = site_macs(ctx)

        def describe(t, chosen=False):
            st = {**pick("w", t), **pick("a", t), **fixed}
            wb = sum(share[k] * b for k, b in st.items() if k[1] == "w")
            ab = sum(share[k] * b for k, b in st.items() if k[1] == "a")
            om = sum(sens.omega[k][b] for k, b in st.items() if k in sens.omega)
            w_bits = {k[0]: b for k, b in st.items() if k[1] == "w"}
            a_bits = {k[0]: b for k, b in st.items() if k[1] == "a"}
            cost = sum(p.site.n_params * w_bits.get(p.site.name, 0) for p in plans if p.site.weight)
            cost += sum(ctx.report["act_sizes"].get(a.tensor, 0.0) * a_bits.get(p.site.name, 0)
                        for p in plans for a in p.site.inputs)
            pt = {"target": round(t, 4), "avg_w_bits": round(wb, 4), "avg_a_bits": round(ab, 4),
                  "cost_bits": int(round(cost)), "gbops": round(gbops(ctx.plan, macs, w_bits, a_bits), 5),
                  "omega": round(om, 6)}
            if chosen:
                pt["chosen"] = True
            return pt, st

        sim = None
        if cfg.max_drop is not None or cfg.pmq_measure_kl or cfg.frontier_plot:
            sim = build_simulator(ctx, prov, {k: max(cands) for k in share if k[1] == "a"} | fixed, max(cands))

        def feeds_of(st):
            return {k: v for (n, t), b in st.items() for k, v in slot_feeds(sim, prov, sites[n], t, b).items()}

        if cfg.max_drop is not None:
            target = self._search_target(ctx, sim, feeds_of, describe, grid_lo, max(cands))

        # the allocation itself: per type, with the held quantizers' share taken off the budget
        state = {**pick("w", target), **pick("a", target), **fixed}
        points = []
        for t in np.arange(grid_lo, max(cands) + 1e-9, 0.25):
            if abs(t - target) > 1e-9:
                points.append(describe(float(t))[0])
        chosen, _ = describe(target, chosen=True)
        points = sorted(points + [chosen], key=lambda p: p["target"])

        apply_widths(ctx, prov, state, "pareto-mp")

        # the chosen point's real KL (one evaluation), for the report and a user comparing
        # allocators; with a plot asked for, also at every whole bit of the frontier (each needs
        # the recipe's quantizers at the widths it uses: OPT-m's searches, seconds per width)
        kl = None
        if sim is not None and (cfg.pmq_measure_kl or cfg.frontier_plot):
            kl = kl_divergence(ref, sim.run(imgs, feeds_of(state)))
            chosen["kl"] = round(kl, 5)
            if cfg.frontier_plot:
                for pt in points:
                    if pt is not chosen and float(pt["target"]).is_integer():
                        pt["kl"] = round(kl_divergence(ref, sim.run(imgs, feeds_of(describe(pt["target"])[1]))), 5)
        del sim
        wb, ab = chosen["avg_w_bits"], chosen["avg_a_bits"]
        ctx.report["pareto_mp"] = {
            "target": target, "candidates": cands, "probe_bits": probe, "images": int(len(imgs)),
            "rows": sens.rows, "runs": sens.runs, "metric_seconds": round(sens.seconds, 3),
            "frontier_seconds": round(t_frontier, 4), "fit_r2": round(sens.fit_r2, 4),
            "omega_from": str(cfg.omega_from) if cfg.omega_from else None,
            "omega": {f"{k[0]}:{k[1]}": {str(b): round(v, 8) for b, v in row.items()}
                      for k, row in sens.omega.items()}}
        ctx.report["frontier"] = points

        if cfg.progress:
            print(f"  pmq: metric {sens.seconds:.1f}s ({sens.runs} runs of {sens.rows} rows, fit R2 "
                  f"{sens.fit_r2:.2f}), frontier {t_frontier * 1000:.0f} ms", file=sys.stderr)
        kl_s = f"; KL {kl:.4f}" if kl is not None else ""
        return PassResult(ctx, False, f"avg W {wb:.2f} / A {ab:.2f} bits (target {target:g}), "
                                      f"{chosen['gbops']:.3f} GBOPs{kl_s}", sites=len(ctx.plan))

    @staticmethod
    def _search_target(ctx: Context, sim, feeds_of, describe, lo: float, hi: float) -> float:
        """--max-drop: the lowest frontier target (a quarter-bit grid) whose top-1 on --val, in the
        fake-quant simulation (nearest rounding), is within max_drop points of float; bisection,
        assuming top-1 does not fall as bits grow. Every tried point goes into the report."""
        from ..calibrate import session
        from ..data import ImageFolder, iter_batches, spread_indices
        from ..evaluator import folder_labels
        from ..modelio import get_preprocess
        cfg = ctx.config
        ds = ImageFolder(cfg.val_dir, ctx.preprocess or get_preprocess(ctx.model))
        labels = folder_labels(ctx.model, ds.classes, cfg.val_dir, ctx.source)
        xs, ys = [], []
        for x, y in iter_batches(ds, 64, spread_indices(len(ds), cfg.val_size)):
            xs.append(x)
            ys.append(labels[y])
        x, y = np.concatenate(xs), np.concatenate(ys)
        fs = session(ctx.model, cfg.threads, providers=cfg.providers)
        f_logits = np.concatenate([fs.run(None, {fs.get_inputs()[0].name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
        del fs
        f_top1 = float((f_logits.argmax(1) == y).mean())
        grid = [float(t) for t in np.arange(lo, hi + 1e-9, 0.25)]
        tried: dict[float, float] = {}

        def top1(t: float) -> float:
            if t not in tried:
                tried[t] = float((sim.run(x, feeds_of(describe(t)[1])).argmax(1) == y).mean())
            return tried[t]

        ok = lambda t: 100 * (f_top1 - top1(t)) <= cfg.max_drop + 1e-9  # noqa: E731
        a, b = 0, len(grid) - 1
        if not ok(grid[b]):
            a = b  # not even the widest configuration: take it, and say so in the report
        while a < b:
            m = (a + b) // 2
            if ok(grid[m]):
                b = m
            else:
                a = m + 1
        chosen = grid[a]
        ctx.report["max_drop"] = {
            "points": cfg.max_drop, "val": str(cfg.val_dir), "images": int(len(x)), "float_top1": round(f_top1, 5),
            "met": bool(ok(chosen)), "target": chosen,
            "tried": [{"target": t, "top1": round(v, 5), "drop_points": round(100 * (f_top1 - v), 3)}
                      for t, v in sorted(tried.items())]}
        if cfg.progress:
            print(f"  pmq: --max-drop {cfg.max_drop:g}: target {chosen:g} bits (top-1 {tried[chosen]:.4f}, float "
                  f"{f_top1:.4f}, {len(x)} images; {len(tried)} points tried)", file=sys.stderr)
        return chosen
