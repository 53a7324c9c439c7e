"""Shared fixtures: the repository root, the verified MNIST files from ../shared, a live SLURM cluster."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DDPM_SHARED", ROOT.parent / "shared"))
MNIST_GZ = SHARED / "data" / "mnist"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(reason):
    """In CI a missing resource is a failure, never a silent skip."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A torchvision data root holding real MNIST, unpacked from the md5-verified .gz files in ../shared."""
    if not (MNIST_GZ / "train-images-idx3-ubyte.gz").exists():
        _missing(f"MNIST .gz files not found in {MNIST_GZ} (set DDPM_SHARED)")
    import torchvision

    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in MNIST_GZ.glob("*.gz"):
        shutil.copy(gz, raw / gz.name)
    # The files are present with the right md5s, so this downloads nothing and only unpacks them.
    torchvision.datasets.MNIST(str(root), train=True, download=True)
    torchvision.datasets.MNIST(str(root), train=False, download=True)
    return root


@pytest.fixture(scope="session")
def slurm():
    """A live cluster from ../shared/slurm-ci/start-slurm.sh (CI starts it; missing in CI is a failure)."""
    if not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None:
        _missing("no SLURM cluster: run ../shared/slurm-ci/start-slurm.sh and export SLURM_CONF")
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or not r.stdout.strip():
        _missing(f"SLURM not responding: {r.stderr.strip()}")
    return os.environ["SLURM_CONF"]
