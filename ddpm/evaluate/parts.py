"""The evaluation's parts, in one table, and :func:`run_parts`, which runs an evaluation's parts in order
and writes ``RUN_DIR/eval/step_XXXXXXXXX/`` (figures, ``metrics.json``, ``report.md``) and
``RUN_DIR/samples.h5``.

Each part function takes (evaluation, out_dir, log, done) (an :class:`ddpm.evaluate.plan.Evaluation`; done:
the sections this evaluation made before it, read only), writes its figures into out_dir and returns a
JSON-ready section for ``metrics.json``; a new part is one function and one row of SECTIONS. ``--only`` names
parts (what the user asks for); a section is what runs: ``grids``, ``metrics``, ``real`` and ``cg`` all ask
for the guidance sweep, which makes the grids and scores the samples that ``real`` (the samples above real
training images) and ``cg`` (classifier guidance at matched accuracy) reuse.
"""
import json
import platform
import time
from pathlib import Path

import torch

from ddpm.diffusion.from_config import CLIPPING
from ddpm.errors import UserError
from ddpm.evaluate import guided, measured, real_rows, report, sampled
from ddpm.evaluate.hparams import write_hparams
from ddpm.run.atomic import atomic_write
from ddpm.run.samples import export_npz

# --only names, in the order the help lists them.
PARTS = ("grids", "real", "curves", "progression", "gifs", "steps", "interpolation", "mixture", "cg", "denoiser",
         "metrics", "fid")
ON_REQUEST = ("fid", "cg")  # run only with their option (--fid-samples N, --classifier-guidance RUN)
KINDS = ("generative", "denoiser", "classifier")  # generative: eps/x0/v/flow; the other two make no samples
# The one table, in running order: (section in metrics.json, function, kinds of run, --only parts asking for it).
SECTIONS = (
    ("guidance", sampled.guidance_part, ("generative",), ("grids", "metrics", "real", "cg")),
    ("fid", sampled.fid_part, ("generative",), ("fid",)),
    ("real_rows", real_rows.real_part, ("generative",), ("real",)),
    ("classifier_guidance", guided.cg_part, ("generative",), ("cg",)),
    ("mixture", guided.mixture_part, ("generative",), ("mixture",)),
    ("curves", measured.curves_part, KINDS, ("curves",)),
    ("progression", sampled.progression_part, ("generative",), ("progression",)),
    ("gifs", sampled.gifs_part, ("generative",), ("gifs",)),
    ("steps", sampled.steps_part, ("generative",), ("steps",)),
    ("interpolation", sampled.interpolation_part, ("generative",), ("interpolation",)),
    ("denoiser", measured.denoiser_part, ("denoiser",), ("denoiser", "metrics")),
    ("accuracy_vs_t", measured.classifier_part, ("classifier",), ("metrics",)),
)
PARTS_BY_KIND = {kind: tuple(p for p in PARTS if any(kind in kinds and p in asks for _, _, kinds, asks in SECTIONS))
                 for kind in KINDS}


def parse_only(text: str | None, kind: str, objective: str) -> tuple:
    """--only 'grids,metrics' → the parts to run (all of the kind's parts for None); UserError otherwise."""
    if text is None:
        return PARTS_BY_KIND[kind]
    names = [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        if name not in PARTS:
            raise UserError(f"unknown --only part {name!r}; choose from: {', '.join(PARTS)}")
        if name not in PARTS_BY_KIND[kind]:
            raise UserError(f"--only {name} does not apply to a run with diffusion.objective={objective}; "
                            f"parts for this run: {', '.join(PARTS_BY_KIND[kind])}")
    if not names:
        raise UserError(f"--only is empty; choose from: {', '.join(PARTS_BY_KIND[kind])}")
    return tuple(p for p in PARTS if p in names)


def tasks(ev) -> list:
    """(section, function) in running order for the evaluation's kind of run and parts."""
    return [(section, fn) for section, fn, kinds, asks in SECTIONS
            if ev.run.objective.kind in kinds and set(asks) & set(ev.parts)]


def versions() -> dict:
    import h5py
    import matplotlib
    import numpy
    import torchvision

    import ddpm
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "h5py": h5py.__version__, "matplotlib": matplotlib.__version__,
            "ddpm-hpc": ddpm.__version__}


def _sampling_sections(ev) -> dict:
    """metrics.json's "sampler" and "guidance" (empty for a run that makes no samples)."""
    ch = ev.sampling
    if ch is None:
        return {"sampler": {"name": None, "steps": None, "note": None, "clip_x0": ev.run.cfg.sample.clip_x0,
                            "eta": None, "fast_sampler": None, "fast_steps": None},
                "guidance": {"convention": None, "scales": [], "display_scale": None, "conditional": False}}
    return {"sampler": {"name": ch.main.sampler, "steps": ch.main.steps, "note": ch.note or None,
                        "clip_x0": ch.main.clip_x0 and ch.main.sampler in CLIPPING, "eta": ch.main.eta,
                        "fast_sampler": ch.fast.sampler,
                        "fast_steps": ch.fast.steps},
            "guidance": {"convention": ch.convention, "scales": list(ch.scales), "display_scale": ch.display_scale,
                         "conditional": ch.conditional}}


def run_parts(ev, argv: list | None = None, log=print) -> dict:
    """Run the evaluation's parts; write figures, samples, metrics.json and report.md. Returns the metrics."""
    t_start = time.perf_counter()
    out = ev.out_dir
    out.mkdir(parents=True, exist_ok=True)
    run, cfg = ev.run, ev.run.cfg
    classifier = ev.scorers.describe_classifier()
    metrics = {
        "run_dir": str(run.run_dir), "run_name": cfg.name, "objective": cfg.diffusion.objective,
        "dataset": cfg.data.dataset, "config_hash": cfg.hash(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m jobs.evaluate " + " ".join(argv) if argv is not None else None,
        "checkpoint": {"step": run.step, "path": str(run.checkpoint_path), "ema": run.ema, "best_step": run.best_step},
        "seed": ev.seed, "device": str(run.device), "parts": list(ev.parts),
        **_sampling_sections(ev),
        "classifier_guidance": ev.guide.settings() | {"cg_scale": list(ev.cg_scales)} if ev.guide else None,
        "mixture": ev.mixture.text() if ev.mixture else None,
        "samples": {"per_class": ev.per_class, "metric_samples": ev.metric_samples,
                    "table_samples": ev.table_samples},
        "classifier": classifier, "classifier_note": ev.scorers.note or None,
        "inception": ev.scorers.inception.describe() if ev.scorers.inception is not None else None,
        "versions": versions(), "archive": {"path": str(run.run_dir / "samples.h5"), "groups": []},
        "export_npz": None, "notes": list(ev.notes), "timings_s": {}, "sections": {},
    }
    for note in [*ev.notes, ev.scorers.note, classifier and classifier["subset_note"]]:
        if note:
            log(f"warning: {note}")
    if ev.sampling and ev.sampling.note:
        log(f"note: sampler: {ev.sampling.note}")
    for name, fn in tasks(ev):
        t0 = time.perf_counter()
        log(f"[eval] {name} ...")
        section = fn(ev, out, log, dict(metrics["sections"]))
        metrics["sections"][name] = section
        metrics["archive"]["groups"] += section.pop("archive_groups", [])
        metrics["timings_s"][name] = round(time.perf_counter() - t0, 3)
        log(f"[eval] {name} done in {metrics['timings_s'][name]:.1f} s")
    if ev.export_npz is not None and metrics["archive"]["groups"]:
        n = export_npz(run.run_dir / "samples.h5", ev.export_npz, metrics["archive"]["groups"])
        metrics["export_npz"] = {"path": str(ev.export_npz), "images": n}
    metrics["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    metrics = _merge_previous(out / "metrics.json", metrics)
    tb = write_hparams(out, cfg, metrics)
    metrics["hparams"] = str(tb) if tb else None
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    atomic_write(out / "report.md", report.render(metrics))
    log(f"[eval] wrote {out / 'report.md'} and metrics.json ({metrics['timings_s']['total']:.1f} s)")
    return metrics


def _merge_previous(path: Path, metrics: dict) -> dict:
    """Keep sections of an earlier evaluation of the same checkpoint that this one did not redo
    (``--only`` runs add to the report instead of replacing it)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return metrics
    same = ("step", "path", "ema")  # the same weights (checkpoints/best may have moved on since)
    if not isinstance(old.get("checkpoint"), dict) or not isinstance(old.get("sections"), dict) or \
            any(old["checkpoint"].get(k) != metrics["checkpoint"][k] for k in same):
        return metrics
    kept = {k: v for k, v in old["sections"].items() if k not in metrics["sections"]}
    if kept:
        metrics["sections"] = {**kept, **metrics["sections"]}
        groups = old.get("archive", {}).get("groups", [])
        metrics["archive"]["groups"] = list(dict.fromkeys(groups + metrics["archive"]["groups"]))
        metrics["timings_s"] = {**{k: v for k, v in old.get("timings_s", {}).items() if k in kept},
                                **metrics["timings_s"]}
    return metrics
