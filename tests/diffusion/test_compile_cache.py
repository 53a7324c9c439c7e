"""ddpm.diffusion.compiled (cache): a persistent inductor cache by default; the user's TORCHINDUCTOR_CACHE_DIR wins."""
import os

from ddpm.diffusion.compiled import CACHE_ENV as ENV
from ddpm.diffusion.compiled import default_cache_dir as default_dir
from ddpm.diffusion.compiled import use_persistent_cache


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
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() != str(default_dir())  # before: inductor's own /tmp default
    monkeypatch.delenv(ENV, raising=False)
    use_persistent_cache()
    assert cache_dir() == str(default_dir())
