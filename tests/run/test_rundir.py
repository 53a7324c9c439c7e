"""ddpm.run.rundir: run-dir names, resume detection, refusing a different config."""
from pathlib import Path

import pytest

from ddpm.config import load_config
from ddpm.errors import UserError
from ddpm.run.rundir import config_differences, default_run_dir, prepare_run_dir, write_config

ROOT = Path(__file__).resolve().parents[2]


def test_run_dir_naming_and_resume_rules(tmp_path):
    cfg = load_config(ROOT / "configs/mnist.yaml", [f"run_root={tmp_path}"], device="cuda")
    first = default_run_dir(cfg)
    assert first.name == "00000-mnist-cond-cfg-b512"
    assert default_run_dir(load_config(ROOT / "configs/mnist.yaml", [f"run_root={tmp_path}"], device="cpu")).name \
        == "00000-mnist-cond-cfg-b64"  # its on_cpu batch
    (tmp_path / "00007-other-b4").mkdir()
    assert default_run_dir(cfg).name == "00008-mnist-cond-cfg-b512"
    run = tmp_path / "run"
    assert prepare_run_dir(cfg, run) == (run, False)
    write_config(run, cfg)
    assert prepare_run_dir(cfg, run) == (run, True)
    longer = load_config(ROOT / "configs/mnist.yaml", [f"run_root={tmp_path}", "train.epochs=40", "log.every=7"],
                         device="cuda")
    assert prepare_run_dir(longer, run) == (run, True)   # extending a run or changing logging resumes
    other = load_config(ROOT / "configs/mnist.yaml", [f"run_root={tmp_path}", "train.lr=5e-4"], device="cuda")
    with pytest.raises(UserError, match=r"different config \(differs in train.lr\).*--force"):
        prepare_run_dir(other, run)
    assert prepare_run_dir(other, run, force=True) == (run, True)
    assert config_differences(cfg.to_dict(), other.to_dict()) == ["train.lr"]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file").write_text("x")
    with pytest.raises(UserError, match="not a run directory"):
        prepare_run_dir(cfg, junk)
