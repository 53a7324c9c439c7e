"""An evaluation's headline numbers next to the run's hyper-parameters, for TensorBoard's HParams plugin.

Every evaluation writes ``RUN/eval/step_XXXXXXXXX/tb/``: one HParams session (the run's hyper-parameters,
the checkpoint and the sampling settings) and its metrics as scalars. ``python -m jobs.tensorboard runs``
then shows all evaluated runs of a sweep as rows of one table (HPARAMS tab: sortable, parallel
coordinates), one row per run and evaluated checkpoint.
"""
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from ddpm.run.evaluations import scale_label, scored_rows

# Config keys shown as hyper-parameters (the model's own keys are added per architecture).
KEYS = (("data", "dataset"), ("data", "hflip"), ("diffusion", "objective"), ("diffusion", "schedule"),
        ("diffusion", "T"), ("diffusion", "p_uncond"), ("train", "batch_size"), ("train", "lr"),
        ("train", "optimizer"), ("train", "ema_decay"), ("train", "warmup_steps"), ("train", "precision"))
METRICS = (("accuracy", "label accuracy"), ("feature_fid", "feature-FID"), ("inception_fid", "Inception FID"),
           ("inception_score", "Inception score"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"))


def _value(v):
    """A config value as HParams takes it: bool, number or str."""
    return v if isinstance(v, (bool, int, float, str)) else str(v)


def hparams_of(cfg, metrics: dict) -> dict:
    """{name: bool | number | str}: the run's hyper-parameters and what this evaluation sampled with."""
    d = cfg.to_dict()
    hp = {"run": cfg.name, "model.arch": d["model"]["arch"]}
    hp.update({f"model.{k}": _value(v) for k, v in sorted(d["model"].items()) if k != "arch"})
    hp.update({f"{section}.{key}": _value(d[section][key]) for section, key in KEYS})
    hp["train.steps"] = metrics["checkpoint"]["step"]  # the evaluated checkpoint's step
    hp["eval.ema"] = bool(metrics["checkpoint"]["ema"])
    hp["eval.sampler"] = f"{metrics['sampler']['name']} {metrics['sampler']['steps']}"
    hp["eval.clip_x0"] = bool(metrics["sampler"].get("clip_x0"))
    return hp


def headline(metrics: dict) -> dict:
    """{tag: float}: accuracy, feature-FID and the Inception metrics per guidance scale, where measured:
    ``eval/KEY/SCALE`` for the guidance sweep's samples, ``eval/KEY_nN/SCALE`` for --fid-samples N."""
    out = {}
    for section, r in scored_rows(metrics):
        n = f"_n{r['n']}" if section == "fid" else ""
        out.update({f"eval/{key}{n}/{scale_label(metrics, r['scale'])}": float(r[key])
                    for key, _ in METRICS if r.get(key) is not None})
    return out


def write_hparams(out_dir: Path, cfg, metrics: dict) -> Path | None:
    """Write the session into ``out_dir/tb`` (replacing an earlier one of the same checkpoint); returns
    that folder, or None when the evaluation measured nothing to compare."""
    values = headline(metrics)
    if not values:
        return None
    tb = Path(out_dir) / "tb"
    for old in tb.glob("events.out.tfevents.*"):  # a re-evaluation replaces the session, never adds a second
        old.unlink()
    step = metrics["checkpoint"]["step"]
    # What SummaryWriter.add_hparams writes, but into this folder itself (it would add a subfolder).
    experiment, session_start, session_end = hparams(hparams_of(cfg, metrics), values)
    with SummaryWriter(log_dir=str(tb)) as w:
        for summary in (experiment, session_start, session_end):
            w.file_writer.add_summary(summary, step)
        for tag, value in values.items():
            w.add_scalar(tag, value, step)
    return tb
