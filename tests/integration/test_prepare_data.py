"""jobs.prepare_data end to end (subprocess, as users run it) and its error paths."""
import shutil
import subprocess
import sys

import pytest

from jobs import prepare_data

from conftest import MNIST_GZ, ROOT


def _run(*args):
    return subprocess.run([sys.executable, "-m", "jobs.prepare_data", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def mnist_gz_root(mnist_root, tmp_path):
    # mnist_root skips (or fails in CI) when the shared .gz files are missing.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in MNIST_GZ.glob("*.gz"):
        shutil.copy(gz, raw / gz.name)
    return tmp_path


def test_offline_unpacks_and_summarises(mnist_gz_root):
    r = _run("--dataset", "mnist", "--root", str(mnist_gz_root), "--offline")
    assert r.returncode == 0, r.stderr
    assert "dataset: mnist" in r.stdout and "60000" in r.stdout and "10000" in r.stdout
    assert str(mnist_gz_root / "MNIST" / "raw") in r.stdout and r.stdout.rstrip().endswith("OK")
    assert (mnist_gz_root / "MNIST" / "raw" / "train-images-idx3-ubyte").stat().st_size == 47040016


def test_offline_with_nothing_there(tmp_path):
    r = _run("--dataset", "mnist", "--root", str(tmp_path), "--offline")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MNIST not found") and "prepare_data" in lines[0]


def test_unknown_dataset(tmp_path):
    r = _run("--dataset", "foo", "--root", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown dataset 'foo'; choose one of: mnist, cifar10 (data.dataset=...)"]


def test_offline_names_a_corrupt_archive(mnist_gz_root, capsys):
    gz = mnist_gz_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:100])
    assert prepare_data.main(["--dataset", "mnist", "--root", str(mnist_gz_root), "--offline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(gz) in err and "md5" in err and err.count("\n") == 1


def test_help_explains_offline(capsys):
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--offline" in out and "cifar-10-python.tar.gz" in out and "MNIST/raw" in out
