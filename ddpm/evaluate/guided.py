"""The evaluation parts that guide with something other than the run's classifier-free guidance (see
:mod:`ddpm.evaluate.parts` for the table; each takes (evaluation, out_dir, log, done)):

- ``cg``: classifier guidance by a noisy-classifier run (``--classifier-guidance RUN``) at each ``--cg-scale``,
  compared with the run's classifier-free guidance sweep *at matched label accuracy*. Both sweeps use the same
  samples' noise and classes (sample i of the evaluation's seed, class i // per_class), the same sampler and
  the same count, and both are scored by the evaluation classifier (not the noisy one that guides). The
  comparison pairs every classifier-guidance scale with the classifier-free scale whose label accuracy is
  closest and sets their feature-FID and time per image side by side; the figure draws both curves over
  accuracy (a conditional run; an unconditional run has no classifier-free guidance, only its curve).
- ``mixture``: guidance toward two or more classes at once (:class:`ddpm.evaluate.guides.Mixture`), a sweep
  from the first class of the mix to the second, the given mix in the middle column.
"""
import time

import numpy as np
import torch

from ddpm.data.images import make_grid
from ddpm.evaluate.guides import Mixture
from ddpm.evaluate.sampled import class_names, fmt, sample, sampler_line, symbol
from ddpm.evaluate import figures
from ddpm.run.grids import grid_figure
from ddpm.run.samples import read_samples, write_samples

MIX_COLUMNS, MIX_ROWS = 7, 4        # the sweep's weights, the noises shown per column


def _ms(row: dict) -> float:
    return round(1000 * row["wall_s"] / row["n"], 3)


def match_accuracy(cg_rows: list[dict], cfg_rows: list[dict]) -> list[dict]:
    """For every classifier-guidance row with an accuracy, the classifier-free row of the closest accuracy:
    [{"cg_scale", "cfg_scale", "accuracy_gap", and each one's accuracy, feature_fid, ms_per_image}]."""
    pairs = []
    usable = [r for r in cfg_rows if r["accuracy"] is not None]
    for r in cg_rows:
        if r["accuracy"] is None or not usable:
            continue
        best = min(usable, key=lambda c: (abs(c["accuracy"] - r["accuracy"]), c["scale"]))
        pairs.append({"cg_scale": r["scale"], "cfg_scale": best["scale"],
                      "accuracy_gap": round(abs(best["accuracy"] - r["accuracy"]), 6),
                      **{f"cg_{k}": r[k] for k in ("accuracy", "feature_fid", "ms_per_image")},
                      **{f"cfg_{k}": best[k] for k in ("accuracy", "feature_fid", "ms_per_image")}})
    return pairs


def cg_part(ev, out, log, done) -> dict:
    """Classifier guidance at each scale → archive groups, a grid next to the classifier-free one, the
    matched-accuracy comparison (table and figure)."""
    run, ch, guide = ev.run, ev.sampling, ev.guide
    sweep, n_cls = done["guidance"], run.num_classes
    k = sweep["per_class"]
    labels = torch.arange(n_cls).repeat_interleave(k)  # the guidance sweep's classes: sample i's noise is shared
    n, h5 = n_cls * k, run.run_dir / "samples.h5"
    rows, groups, columns = [], [], []
    for scale in ev.cg_scales:
        g = guide.at(scale)
        t0 = time.perf_counter()
        u8 = run.to_u8(sample(ev, run.net, ch.main, labels, n, guide=g))
        wall = time.perf_counter() - t0
        group = f"{ev.group_prefix}/{g.name}"
        write_samples(h5, group, u8, labels.numpy(), dict(
            step=run.step, sampler=ch.main.sampler, steps=ch.main.steps, eta=ch.main.eta or None, seed=ev.seed,
            ema=run.ema, config_hash=run.cfg.hash(), checkpoint=str(run.checkpoint_path), per_class=k,
            labels="the class each sample is guided toward", **g.settings()))
        groups.append(group)
        row = {"scale": scale, "n": n, "group": group, "wall_s": round(wall, 3), **ev.scorers.score(u8, labels)}
        row["ms_per_image"] = _ms(row)
        rows.append(row)
        columns.append((f"CG {g.label}", u8[::k]))
        log(f"  classifier guidance {g.label}: {n} samples in {wall:.1f} s · accuracy {fmt(row['accuracy'])} · "
            f"feature-FID {fmt(row['feature_fid'])}")
    sym = symbol(ev)
    cfg_rows = [{"scale": r["scale"], "n": r["n"], "accuracy": r["accuracy"], "feature_fid": r["feature_fid"],
                 "ms_per_image": _ms(r), "group": r["group"]} for r in sweep["rows"]] if ch.conditional else []
    cfg_columns = [(f"CFG {sym}={r['scale']:g}", read_samples(h5, r["group"])[0][::k]) for r in cfg_rows]
    cells = np.stack([c for _, c in cfg_columns + columns], 1).reshape(-1, *columns[0][1].shape[1:])
    c = guide.classifier
    who = f"noisy classifier {c.cfg.name} · step {c.step} ({'EMA' if c.ema else 'raw'}) · {c.run_dir}"
    figs = [grid_figure(
        out / "cg_grid.png", make_grid(cells, len(cfg_columns) + len(columns)), rows=n_cls,
        cols=len(cfg_columns) + len(columns), scale=3,  # room for the column labels
        title=["Classifier-free (CFG) vs classifier guidance (CG) (one noise per row, shared by all columns)",
               run.checkpoint_line, sampler_line(ev, ch.main, guide="CG guides the unconditional prediction"), who],
        row_labels=class_names(ev), col_labels=[label for label, _ in cfg_columns + columns],
        xlabel="guidance method and scale", ylabel="requested class")]
    curves = {"classifier guidance (scale s)": [dict(r, scale_label=f"s={r['scale']:g}") for r in rows]}
    if cfg_rows:
        curves[f"classifier-free guidance ({sym})"] = [dict(r, scale_label=f"{sym}={r['scale']:g}") for r in cfg_rows]
    figs.append(figures.guidance_comparison_figure(out / "cg_vs_cfg.png", curves, [
        "Classifier guidance vs classifier-free guidance at matched label accuracy", run.checkpoint_line,
        f"{n} samples per scale, same noise and classes · {ch.main.describe()}"]))
    return {"classifier": {k: v for k, v in guide.settings().items() if k != "cg_scale"}, "scales": list(ev.cg_scales),
            "per_class": k, "rows": rows, "cfg_rows": cfg_rows, "matched": match_accuracy(rows, cfg_rows),
            "convention": ch.convention, "figures": figs, "archive_groups": groups}


def mixture_part(ev, out, log, done=None) -> dict:
    """The sweep between the mix's first two classes: column λ weights them 2(1 - λ) w_a and 2λ w_b (the other
    classes keep theirs), so the middle column is the mix as given and the ends are one class each; the
    evaluation classifier's share of each class per column."""
    run, mix, spec = ev.run, ev.mixture, ev.sampling.main
    (a, b), (wa, wb) = mix.classes[:2], mix.weights[:2]
    names = class_names(ev)
    n = max(MIX_ROWS, ev.table_samples)
    rows, cells = [], []
    for lam in np.linspace(0.0, 1.0, MIX_COLUMNS).tolist():
        m = Mixture(mix.classes, (round(2 * (1 - lam) * wa, 4), round(2 * lam * wb, 4)) + mix.weights[2:])
        t0 = time.perf_counter()
        u8 = run.to_u8(sample(ev, run.net, spec, None, n, guide=m))
        shares = ev.scorers.shares(u8, (a, b))
        rows.append({"lambda": lam, "mix": m.text(), "weights": list(m.weights[:2]), "n": n,
                     "wall_s": round(time.perf_counter() - t0, 3),
                     "share_a": shares and shares[0], "share_b": shares and shares[1]})
        cells.append(u8[:MIX_ROWS])
        log(f"  mix {m.text()}: {n} samples · classified {names[a]} {fmt(rows[-1]['share_a'])}, "
            f"{names[b]} {fmt(rows[-1]['share_b'])}")
    grid = np.stack(cells, 1).reshape(-1, *cells[0].shape[1:])
    title = ["Class mixture: eps_u + Σ w_i (eps_ci − eps_u) (Liu et al. 2022, conjunction)", run.checkpoint_line,
             sampler_line(ev, spec, guide=f"mix {mix.text()} in the middle column; one noise per row")]
    figs = [grid_figure(
        out / "mixture_sweep.png", make_grid(grid, MIX_COLUMNS), rows=MIX_ROWS, cols=MIX_COLUMNS, title=title,
        scale=3, col_labels=[f"{r['weights'][0]:.2g} · {r['weights'][1]:.2g}" for r in rows],
        xlabel=f"weights of class {names[a]} · class {names[b]} (λ = 0 … 1)", ylabel="one noise per row")]
    if rows[0]["share_a"] is not None:
        lams = [r["lambda"] for r in rows]
        figs.append(figures.line_figure(
            out / "mixture_shares.png", lams, {f"classified as {names[a]}": [r["share_a"] for r in rows],
                                               f"classified as {names[b]}": [r["share_b"] for r in rows]},
            title=["Class mixture: what the evaluation classifier sees", run.checkpoint_line,
                   f"{n} samples per column, weights 2(1−λ)·{wa:g} on {names[a]} and 2λ·{wb:g} on {names[b]}"],
            xlabel="λ (0: only the first class, 0.5: the mix as given, 1: only the second)",
            ylabel="fraction of samples", ylim=(-0.02, 1.02), marker_x=0.5, marker_label=f"--mix {mix.text()}"))
    return {"mix": mix.text(), "classes": list(mix.classes), "class_names": [names[c] for c in mix.classes],
            "rows": rows, "figures": figs}
