"""What ``jobs.evaluate`` leaves in ``RUN_DIR/eval/step_XXXXXXXXX/metrics.json``, read the same way by the
evaluation's HParams session (``ddpm.evaluate.hparams``) and by ``jobs.submit --status``
(``ddpm.cluster.sweep``, which may not import torch): the sections with one row of scores per guidance
scale, and how a scale is labelled.
"""

# Sections of metrics.json with per-scale rows: the guidance sweep's samples, then --fid-samples N.
SCORED_SECTIONS = ("guidance", "fid")


def convention_symbol(convention: str) -> str:
    """The guidance scale's letter in labels: γ (gamma convention) or w."""
    return "γ" if convention == "gamma" else "w"


def scale_label(metrics: dict, scale: float) -> str:
    """'γ=5', 'w=3', or 'uncond' for an unconditional model."""
    g = metrics["guidance"]
    return f"{convention_symbol(g['convention'])}={scale:g}" if g["conditional"] else "uncond"


def scored_rows(metrics: dict) -> list[tuple[str, dict]]:
    """(section, row) for every per-scale row of scores, in SCORED_SECTIONS order."""
    sections = metrics.get("sections") or {}
    return [(name, row) for name in SCORED_SECTIONS for row in (sections.get(name) or {}).get("rows", [])]


def headline_row(metrics: dict) -> tuple[str, dict]:
    """(section, row) that sums an evaluation up: the --fid-samples rows if there are any, else the guidance
    sweep's; at the scale of the single-scale figures, else the first. KeyError/StopIteration if none."""
    rows = scored_rows(metrics)
    section = "fid" if any(name == "fid" for name, _ in rows) else "guidance"
    mine = {r["scale"]: r for name, r in rows if name == section}
    return section, mine.get(metrics["guidance"]["display_scale"]) or next(iter(mine.values()))
