"""ddpm.run.evaluations: reading an evaluation's metrics.json rows (for HParams and jobs.submit --status)."""
import pytest

from ddpm.run.evaluations import headline_row, scale_label, scored_rows


def _metrics(conditional=True, convention="w", fid=True):
    rows = [{"scale": 0.0, "n": 100}, {"scale": 3.0, "n": 100}]
    sections = {"guidance": {"rows": rows}, "curves": {"figures": []}}
    if fid:
        sections["fid"] = {"rows": [{"scale": 0.0, "n": 50000}]}
    return {"guidance": {"convention": convention, "conditional": conditional, "display_scale": 3.0},
            "sections": sections}


def test_rows_labels_and_the_headline_row():
    m = _metrics()
    assert [(s, r["scale"]) for s, r in scored_rows(m)] == [("guidance", 0.0), ("guidance", 3.0), ("fid", 0.0)]
    assert scale_label(m, 3.0) == "w=3" and scale_label(_metrics(convention="gamma"), 5.0) == "γ=5"
    assert scale_label(_metrics(conditional=False), 1.0) == "uncond"
    # --fid-samples rows win (at the display scale if there, else the first); else the guidance sweep's
    assert headline_row(m) == ("fid", {"scale": 0.0, "n": 50000})
    assert headline_row(_metrics(fid=False)) == ("guidance", {"scale": 3.0, "n": 100})
    with pytest.raises((KeyError, StopIteration)):
        headline_row({"guidance": {"display_scale": 1.0}, "sections": {"curves": {}}})
