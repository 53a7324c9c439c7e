"""ddpm.run.restarts: the one definition of what a restart needs (the step `latest` names, the count of
restarts without progress and its limit, the rendezvous port); the templates' agreement with it is in
tests/integration/test_slurm.py, the CLI they call in tests/cluster/test_cluster.py."""
import pytest

from ddpm.errors import UserError
from ddpm.run import restarts


@pytest.mark.parametrize("text,step", [("step_000001234\n", 1234), ("step_7", 7), ("  step_000000000 \n", 0),
                                       ("", None), ("1234", None), ("step_", None), ("step_12.old", None),
                                       ("step_-3", None), ("step_12 step_13", None), ("latest", None)])
def test_parse_latest_takes_only_a_step_dir_name(text, step):
    assert restarts.parse_latest(text) == step


def test_latest_step_is_minus_one_without_a_readable_pointer(tmp_path):
    assert restarts.latest_step(tmp_path / "no-run") == restarts.NONE == -1
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_bytes(b"\xff\xfe garbage")
    assert restarts.latest_step(tmp_path) == -1
    (tmp_path / "checkpoints" / "latest").write_text("step_000000040\n")
    assert restarts.latest_step(tmp_path) == 40


def test_idle_restarts_count_stops_without_progress_and_reset_on_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    run = tmp_path / "run"  # made by the first record (a job stopped before jobs.train created it)
    assert restarts.idle_restarts(run) == 0 and not run.exists()
    assert restarts.idle_restarts(run, stopped_at=-1) == 1  # stopped before any checkpoint: no progress
    assert restarts.idle_restarts(run, stopped_at=-1) == 2
    assert restarts.idle_restarts(run, stopped_at=10) == 0  # past the recorded -1
    assert [restarts.idle_restarts(run, stopped_at=10) for _ in range(3)] == [1, 2, 3]
    assert restarts.idle_restarts(run) == 3  # reading does not count
    assert (run / restarts.RESTARTS_FILE).read_text() == "3 10 101\n"
    assert restarts.idle_restarts(run, stopped_at=20) == 0


def test_a_new_job_starts_a_new_count(tmp_path, monkeypatch):
    """A resubmission on the same run dir (another SLURM job id) is not held back by an earlier job's count,
    nor by a file of another layout (the templates' before this module) or a garbled one."""
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    for _ in range(4):
        restarts.idle_restarts(tmp_path, stopped_at=10)
    monkeypatch.setenv("SLURM_JOB_ID", "202")
    assert restarts.idle_restarts(tmp_path) == 0
    assert restarts.idle_restarts(tmp_path, stopped_at=10) == 0  # its first stop compares with nothing
    for old in ("5 10\n", "x y z\n", ""):
        (tmp_path / restarts.RESTARTS_FILE).write_text(old)
        assert restarts.idle_restarts(tmp_path) == 0


@pytest.mark.parametrize("value,limit", [(None, restarts.MAX_IDLE_RESTARTS), ("", 2), ("0", 0), ("5", 5), (" 3 ", 3)])
def test_max_idle_restarts_default_and_override(value, limit):
    env = {} if value is None else {"DDPM_MAX_IDLE_RESTARTS": value}
    assert restarts.max_idle_restarts(env) == limit


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_max_idle_restarts_refuses_nonsense_in_one_line(value):
    with pytest.raises(UserError, match=f"DDPM_MAX_IDLE_RESTARTS='{value}' is not a whole number"):
        restarts.max_idle_restarts({"DDPM_MAX_IDLE_RESTARTS": value})


def test_master_port_deterministic_in_range_and_moves_on_restart():
    assert restarts.master_port(123456, 0) == restarts.master_port(123456, 0)
    for job in (1, 7, 123456, 98765432, 2**40):
        ports = [restarts.master_port(job, r) for r in range(4)]
        assert all(20000 <= p < 60000 for p in ports) and len(set(ports)) == 4
    assert len({restarts.master_port(job, 0) for job in range(1000, 1100)}) > 90  # jobs on one node rarely collide
