"""ddpm.diffusion.compiled (cache, workers, numerics): a persistent inductor cache by default, the user's
TORCHINDUCTOR_CACHE_DIR wins, a directory that is not writable falls back to the job's node-local one;
compile workers bounded by SLURM_CPUS_PER_TASK; the full-float32 switch sets and restores every flag."""
import os

import pytest
import torch

from ddpm.diffusion.compiled import CACHE_ENV as ENV
from ddpm.diffusion.compiled import WORKERS_ENV, bound_compile_workers, ieee_fp32, use_persistent_cache
from ddpm.diffusion.compiled import default_cache_dir as default_dir


def test_default_is_under_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert use_persistent_cache() == tmp_path / ".cache" / "ddpm-hpc" / "torchinductor"
    assert os.environ[ENV] == str(tmp_path / ".cache" / "ddpm-hpc" / "torchinductor")


def test_xdg_cache_home_is_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "ddpm-hpc" / "torchinductor"


def test_an_explicit_directory_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert use_persistent_cache() == tmp_path / "mine"
    assert os.environ[ENV] == str(tmp_path / "mine")


def test_inductor_reads_the_directory_we_set(monkeypatch, tmp_path):
    """The contract we rely on: inductor takes its cache directory from the variable at use time."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # torch < 2.5
        from torch._inductor.utils import cache_dir

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() != str(default_dir())  # before: inductor's own /tmp default
    monkeypatch.delenv(ENV, raising=False)
    use_persistent_cache()
    assert cache_dir() == str(default_dir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
@pytest.mark.parametrize("chosen", [True, False])
def test_a_cache_directory_that_is_not_writable_falls_back_to_the_job_tmpdir(monkeypatch, tmp_path, chosen):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)  # a read-only home, as on some clusters' compute nodes
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "job"))
    if chosen:
        monkeypatch.setenv(ENV, str(home / "mine"))
    else:
        monkeypatch.delenv(ENV, raising=False)
    lines = []
    got = use_persistent_cache(log=lines.append)
    assert got.parent == tmp_path / "job" and got.name.startswith("ddpm-hpc-torchinductor-")
    assert os.environ[ENV] == str(got) and got.is_dir()
    assert len(lines) == 1 and "is not writable" in lines[0] and f"set {ENV}" in lines[0]


def test_an_unwritable_directory_as_root_too(monkeypatch, tmp_path):
    """A path below a regular file cannot be created by anyone, root included."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(ENV, str(tmp_path / "file" / "cache"))
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lines = []
    assert use_persistent_cache(log=lines.append).parent == tmp_path / "tmp" and len(lines) == 1


def test_compile_workers_are_bounded_by_the_cpus_of_the_task(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.delenv(WORKERS_ENV, raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert bound_compile_workers() is None and WORKERS_ENV not in os.environ
    before = inductor.compile_threads  # saved by hand: monkeypatch would delete a config entry on undo
    try:
        inductor.compile_threads = 64  # what inductor took from a 64-core node
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        assert bound_compile_workers() == 1 and os.environ[WORKERS_ENV] == "1" and inductor.compile_threads == 1
        monkeypatch.setenv(WORKERS_ENV, "3")  # the user's own choice wins
        assert bound_compile_workers() == 3
    finally:
        inductor.compile_threads = before


def test_ieee_fp32_sets_and_restores_every_flag_together():
    b = torch.backends
    new_api = hasattr(getattr(b.cudnn, "conv", None), "fp32_precision")
    if not new_api:
        pytest.skip("this torch has only the allow_tf32 flags")
    owners = {"cudnn": b.cudnn, "cudnn.conv": b.cudnn.conv, "cudnn.rnn": b.cudnn.rnn, "cuda.matmul": b.cuda.matmul}
    before = {k: o.fp32_precision for k, o in owners.items()}
    try:
        b.cudnn.conv.fp32_precision = "ieee"  # conv and rnn different: what the old switch left behind
        mixed = {k: o.fp32_precision for k, o in owners.items()}
        with ieee_fp32():
            assert {k: o.fp32_precision for k, o in owners.items()} == dict.fromkeys(owners, "ieee")
        assert {k: o.fp32_precision for k, o in owners.items()} == mixed
        b.cudnn.conv.fp32_precision = before["cudnn.conv"]
        with pytest.raises(RuntimeError, match="x"):
            with ieee_fp32():
                raise RuntimeError("x")  # restored on the way out of an exception too
        assert {k: o.fp32_precision for k, o in owners.items()} == before
        assert isinstance(b.cudnn.allow_tf32, bool)  # readable again (it raises while conv and rnn differ)
    finally:
        for k, o in owners.items():
            o.fp32_precision = before[k]
