"""ddpm.cluster without a cluster: sbatch time strings, sweep parsing and planning, resources, sinfo / sacct /
squeue output, manifests and the status table."""
import json
import subprocess
import sys
import time

import pytest

from ddpm.cluster import requeue, sweep
from ddpm.cluster import slurm as cluster
from ddpm.errors import REQUEUE_EXIT_CODE, UserError
from ddpm.run import restarts

from conftest import ROOT, python_env


# ----- parsing and planning -------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("90", 5400), ("30:00", 1800), ("1:30", 90), ("24:00:00", 86400),
                                          ("02:03:04", 7384), ("2-00:00:00", 172800), ("1-12", 129600),
                                          ("1-0:30", 88200)])
def test_parse_time_accepts_sbatch_formats(text, seconds):
    assert cluster.parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:99", "1:00:60", "1-24:00:00", "0", "00:00:00", "-5", "1.5", "1:2:3:4"])
def test_parse_time_rejects_nonsense(text):
    with pytest.raises(UserError, match="time"):
        cluster.parse_time(text)


def test_format_time():
    assert cluster.format_time(90) == "00:01:30" and cluster.format_time(86400 + 3661) == "1-01:01:01"


def test_sweep_values_split_at_top_level_commas():
    assert sweep.split_values("1e-3,2e-3") == ["1e-3", "2e-3"]
    assert sweep.split_values("[1.0, 3.0],[1.0]") == ["[1.0, 3.0]", "[1.0]"]
    assert sweep.parse_sweeps(["train.lr=1e-3,2e-3", "model.hidden=8,16"], []) == [
        ("train.lr", ["1e-3", "2e-3"]), ("model.hidden", ["8", "16"])]
    assert sweep.expand_sweeps([("a.x", ["1", "2"]), ("b.y", ["u", "v"])]) == [
        ["a.x=1", "b.y=u"], ["a.x=1", "b.y=v"], ["a.x=2", "b.y=u"], ["a.x=2", "b.y=v"]]
    assert sweep.expand_sweeps([]) == [[]]


@pytest.mark.parametrize("items,overrides,match", [
    (["train.lr"], [], "malformed --sweep"), (["train.lr="], [], "malformed"), (["=1,2"], [], "malformed"),
    (["train.lr=1,,2"], [], "malformed"), (["train..lr=1"], [], "malformed"),
    (["train.lr=1,1"], [], "repeats"), (["train.lr=1,2"], ["train.lr=3"], "given twice"),
    (["train.lr=1", "train.lr=2"], [], "given twice")])
def test_malformed_sweeps(items, overrides, match):
    with pytest.raises(UserError, match=match):
        sweep.parse_sweeps(items, overrides)


def test_plan_names_run_dirs_and_validates_every_value(config_only, tmp_path):
    root = tmp_path / "runs"
    (root / "00007-old").mkdir(parents=True)
    jobs = sweep.plan_jobs(config_only, ["train.steps=5"], ["train.lr=1e-3,2e-3", "model.hidden=8,16"], root)
    assert [j.run_dir.name for j in jobs] == ["00008-tiny-lr1e-3-hidden8", "00009-tiny-lr1e-3-hidden16",
                                              "00010-tiny-lr2e-3-hidden8", "00011-tiny-lr2e-3-hidden16"]
    assert jobs[1].overrides == ["train.steps=5", "train.lr=1e-3", "model.hidden=16"]
    assert jobs[1].sweep == ["train.lr=1e-3", "model.hidden=16"] and jobs[1].run_dir.parent == root.resolve()
    assert not any(j.run_dir.exists() for j in jobs)  # planning writes nothing
    assert sweep.plan_jobs(config_only, [], [], root)[0].run_dir.name == "00008-tiny-b32"
    with pytest.raises(UserError, match=r"^sweep value train.lr=-1: train.lr must be in"):
        sweep.plan_jobs(config_only, [], ["train.lr=1e-3,-1"], root)
    with pytest.raises(UserError, match="not divisible by the 3 ranks"):
        sweep.plan_jobs(config_only, [], [], root, world_size=3)
    with pytest.raises(UserError, match="train.device=cuda but --gpus-per-node 0"):
        sweep.plan_jobs(config_only, ["train.device=cuda"], [], root, gpus=False)


def test_resources_checks_and_sbatch_parameters():
    launch = pytest.importorskip("ddpm.cluster.launch", reason="submitit is not installed")
    res = launch.Resources(nodes=2, gpus_per_node=4, time_s=3600, partition="gpu", mem="64G", signal_delay_s=120)
    res.check()
    p = res.executor_parameters("cifar")
    assert p["ntasks_per_node"] == 4 and p["gpus_per_node"] == 4 and p["time"] == 60 and p["nodes"] == 2
    assert p["signal_delay_s"] == 120 and p["additional_parameters"] == {"requeue": True}
    assert p["srun_args"] == ["--kill-on-bad-exit=1"]  # a crashed rank ends the step, no collective hang
    assert "PYTHONPATH" in p["setup"][0] and res.world_size == 8
    cpu = launch.Resources(gpus_per_node=0, time_s=61)
    assert "gpus_per_node" not in cpu.executor_parameters("x") and cpu.tasks_per_node == 1
    flags = launch.sbatch_flags(p, 3)
    assert "--signal=USR2@120" in flags and "--requeue" in flags and "--array=0-2" in flags
    for bad, match in [(dict(time_s=120), "no room for --signal-delay"), (dict(mem="4X"), "invalid --mem"),
                       (dict(nodes=0), "--nodes must be"), (dict(gpus_per_node=-1), "--gpus-per-node")]:
        with pytest.raises(UserError, match=match):
            launch.Resources(**bad).check()


def test_partitions_and_job_states_from_slurm_output(monkeypatch):
    outputs = {
        "sinfo": "gpu*|2-00:00:00|3|gpu:a100:4(S:0-1)\ngpu*|2-00:00:00|1|gpu:a100:8\ncpu|infinite|10|(null)\n",
        "sacct": "7|REQUEUED|2026-01-01T10:00:00\n8_0|COMPLETED|2026-01-01T10:00:01\n7|RUNNING|2026-01-01T10:05:00\n"
                 "9_[0-2%2]|PENDING|Unknown\n10|CANCELLED by 0|2026-01-01T10:00:00\n",
        "squeue": "11|PENDING\n",
    }
    monkeypatch.setattr(cluster, "_run", lambda cmd: outputs[cmd[0]])
    parts = cluster.partitions()
    assert parts["gpu"] == cluster.Partition("gpu", True, 172800, 4, 8)
    assert parts["cpu"] == cluster.Partition("cpu", False, None, 10, 0)
    assert cluster.check_request(None, 1, 8, 3600).name == "gpu"
    for args, match in [(("nope", 1, 1, 60), "unknown partition 'nope'; this cluster has: gpu, cpu"),
                        (("gpu", 1, 1, 3 * 86400), "exceeds the time limit"), (("gpu", 5, 1, 60), "4 node"),
                        (("cpu", 1, 1, 60), "at most 0 GPU")]:
        with pytest.raises(UserError, match=match):
            cluster.check_request(*args)
    states = cluster.job_states(["7", "8_0", "9_1", "10", "11", "12"])
    assert states == {"7": ("RUNNING", 2), "8_0": ("COMPLETED", 1), "9_1": ("PENDING", 1), "10": ("CANCELLED", 1),
                      "11": ("PENDING", 1), "12": ("UNKNOWN", 0)}


def test_manifest_roundtrip_and_status_table(tmp_path):
    run = tmp_path / "runs" / "00000-tiny-lr1e-3"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    path = sweep.new_manifest_path(tmp_path / "runs", "tiny")
    sweep.write_manifest(path, {"executor": "local", "jobs": [
        {"job_id": "local-0", "run_dir": str(run), "sweep": ["train.lr=1e-3"], "state": "COMPLETED"},
        {"job_id": "local-1", "run_dir": str(tmp_path / "missing"), "sweep": [], "state": "PENDING"}]})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
    rows = sweep.status_rows(sweep.read_manifest(path))
    assert (rows[0]["state"], rows[0]["step"], rows[0]["loss"]) == ("COMPLETED", 3, pytest.approx(1 / 3))
    assert (rows[1]["step"], rows[1]["loss"]) == (None, None)
    table = sweep.format_status(rows).splitlines()
    assert table[0].split()[:6] == ["JOB", "STATE", "REQUEUES", "STEP", "LOSS", "EVALUATED"]
    assert table[1].split()[:7] == ["local-0", "COMPLETED", "0", "3", "0.3333", "-", "train.lr=1e-3"]
    # Once evaluated: the newest evaluation's numbers at its single-figure scale.
    for step, acc in ((2, 0.5), (3, 0.95)):
        (run / "eval" / f"step_{step:09d}").mkdir(parents=True)
        (run / "eval" / f"step_{step:09d}" / "metrics.json").write_text(json.dumps({
            "checkpoint": {"step": step}, "guidance": {"convention": "gamma", "display_scale": 5.0, "conditional": True},
            "sections": {"guidance": {"rows": [{"scale": 1.0, "accuracy": 0.1, "feature_fid": 9.0},
                                               {"scale": 5.0, "accuracy": acc, "feature_fid": 2.5,
                                                "inception_fid": None}]}}}))
    (run / "eval" / "step_000000004").mkdir()  # an evaluation still running: no metrics.json yet
    rows = sweep.status_rows(sweep.read_manifest(path))
    assert rows[0]["eval"] == "step 3: acc 0.950 fFID 2.5 (γ=5)" and rows[1]["eval"] is None
    assert "step 3: acc 0.950 fFID 2.5 (γ=5)  train.lr=1e-3" in sweep.format_status(rows)
    # --fid-samples rows win: they are the paper-scale numbers
    m = json.loads((run / "eval" / "step_000000003" / "metrics.json").read_text())
    m["sections"]["fid"] = {"rows": [{"scale": 5.0, "n": 50000, "accuracy": 0.9, "inception_fid": 3.171,
                                      "inception_score": 9.46}]}
    (run / "eval" / "step_000000003" / "metrics.json").write_text(json.dumps(m))
    rows = sweep.status_rows(sweep.read_manifest(path))
    assert rows[0]["eval"] == "step 3: acc 0.900 FID 3.17 IS 9.46 (γ=5, 50000 samples)", rows[0]["eval"]
    with pytest.raises(UserError, match="not found"):
        sweep.read_manifest(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not a manifest"):
        sweep.read_manifest(tmp_path / "bad.json")


# ----- python -m ddpm.cluster.requeue: what the sbatch templates ask ----------------------------------

@pytest.mark.parametrize("argv,value", [(["exit-code"], REQUEUE_EXIT_CODE), (["max-idle-restarts"], 2),
                                        (["master-port", "123456", "3"], restarts.master_port(123456, 3))])
def test_requeue_cli_prints_the_one_definition(argv, value, capsys, monkeypatch):
    monkeypatch.delenv("DDPM_MAX_IDLE_RESTARTS", raising=False)
    assert requeue.main(argv) == 0 and capsys.readouterr().out == f"{value}\n"


def test_requeue_cli_keeps_the_count_in_the_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000000030\n")
    for argv in (["latest-step", str(tmp_path)], ["idle-restarts", str(tmp_path), "--record", "30"],
                 ["idle-restarts", str(tmp_path), "--record", "30"], ["idle-restarts", str(tmp_path)],
                 ["latest-step", str(tmp_path / "nothing")]):
        assert requeue.main(argv) == 0
    assert capsys.readouterr().out.split() == ["30", "0", "1", "1", "-1"]
    assert restarts.idle_restarts(tmp_path) == 1  # the same count the submitit launcher reads


@pytest.mark.parametrize("argv,env,match", [
    ([], {}, "the following arguments are required: COMMAND"), (["nonsense"], {}, "invalid choice: 'nonsense'"),
    (["master-port", "12x", "0"], {}, "argument JOB_ID: invalid int value: '12x'"),
    (["idle-restarts", ".", "--record", "many"], {}, "argument --record: invalid int value"),
    (["max-idle-restarts"], {"DDPM_MAX_IDLE_RESTARTS": "lots"}, "DDPM_MAX_IDLE_RESTARTS='lots' is not a whole number")])
def test_requeue_cli_bad_arguments_are_one_line_and_exit_2(argv, env, match, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        rc = requeue.main(argv)
    except SystemExit as e:  # argparse's own checks
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1, err


def test_requeue_cli_is_quick_and_imports_no_torch():
    """The batch shell calls it several times per run: no torch, well under half a second a call."""
    cmd = [sys.executable, "-X", "importtime", "-m", "ddpm.cluster.requeue", "master-port", "7", "0"]
    best = float("inf")
    for _ in range(3):
        start = time.monotonic()
        r = subprocess.run(cmd, cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=60)
        best = min(best, time.monotonic() - start)
        assert r.returncode == 0 and r.stdout == f"{restarts.master_port(7, 0)}\n", r.stderr
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "numpy", "submitit", "ddpm.config"} & imported, sorted(imported)
    assert best < 0.5, f"python -m ddpm.cluster.requeue took {best:.2f} s"
    help_text = subprocess.run([sys.executable, "-m", "ddpm.cluster.requeue", "--help"], cwd=ROOT, env=python_env(),
                               capture_output=True, text=True, timeout=60).stdout
    for command in ("exit-code", "master-port", "latest-step", "idle-restarts", "max-idle-restarts"):
        assert command in help_text
