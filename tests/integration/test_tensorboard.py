"""jobs.tensorboard: TensorBoard on 127.0.0.1 only, serving a real run's scalars; the ssh tunnel lines;
port in use and a missing run root are one-line errors with exit code 2."""
import json
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ddpm.cluster import tensorboard as tbs
from jobs import tensorboard as tb_job

from conftest import ROOT, python_env, write_tiny_config


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, mnist_root):
    """A run root holding one finished tiny run (8 steps, every step logged)."""
    tmp = tmp_path_factory.mktemp("tb")
    config = write_tiny_config(tmp, mnist_root)
    root = tmp / "runs"
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(config), "train.steps=8",
                        "--run-dir", str(root / "00000-tiny")], cwd=ROOT, env=python_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return root


def listeners(port):
    """Local addresses listening on TCP `port` (IPv4 and IPv6), from /proc/net/tcp*."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                found.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return found


def get_json(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def read_lines(proc, lines):
    for line in proc.stdout:
        lines.append(line)


def test_serves_the_runs_scalars_on_localhost_only(run_root):
    port = tbs.free_port()
    env = {k: v for k, v in python_env().items() if k != "SLURM_JOB_ID"}  # as on a login node
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tensorboard", str(run_root), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    threading.Thread(target=read_lines, args=(proc, out), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any("ssh -N" in line for line in out):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(out)
            time.sleep(0.1)
        user = env.get("USER") or __import__("getpass").getuser()
        assert f"ssh -N -L {port}:localhost:{port} {user}@{socket.gethostname()}\n" in [s.strip(" ") for s in out]
        assert listeners(port) == ["127.0.0.1"], listeners(port)  # not 0.0.0.0, not IPv6

        run = "00000-tiny/tb"
        expected = {r["step"]: r for r in map(json.loads, (run_root / "00000-tiny" / "metrics.jsonl").open())}
        assert sorted(expected) == list(range(1, 9))
        deadline = time.monotonic() + 60
        while "loss" not in get_json(port, "/data/plugin/scalars/tags").get(run, {}):
            assert time.monotonic() < deadline, get_json(port, "/data/plugin/scalars/tags")
            time.sleep(0.5)
        tags = get_json(port, "/data/plugin/scalars/tags")[run]
        assert {"loss", "loss/q0", "loss/q3", "lr", "grad_norm", "images_per_s"} <= set(tags)
        for tag in ("loss", "lr", "grad_norm"):
            query = urllib.parse.urlencode({"run": run, "tag": tag})
            points = get_json(port, f"/data/plugin/scalars/scalars?{query}")  # [[wall_time, step, value], ...]
            assert [p[1] for p in points] == sorted(expected), tag
            for _, step, value in points:  # TensorBoard stores float32
                assert math.isclose(value, expected[step][tag], rel_tol=1e-6, abs_tol=1e-9), (tag, step)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_port_in_use_is_a_one_line_error(tmp_path, capsys, host):
    with socket.socket() as s:
        s.bind((host, 0))
        s.listen()
        port = s.getsockname()[1]
        assert tb_job.main([str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: port {port} is already in use") and err.count("\n") == 1, err


def test_missing_run_root_and_bad_port(tmp_path, capsys):
    assert tb_job.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith(f"error: run root {tmp_path / 'nope'} is not a directory")
    assert tb_job.main([str(tmp_path), "--port", "70000"]) == 2
    assert "not a TCP port" in capsys.readouterr().err


def test_tunnel_commands():
    host = socket.gethostname()
    assert tbs.tunnel_command(6006, env={"USER": "ada"}) == f"ssh -N -L 6006:localhost:6006 ada@{host}"
    assert tbs.tunnel_command(6006, "bender", env={"USER": "ada"}) == "ssh -N -L 6006:localhost:6006 ada@bender"
    on_node = {"USER": "ada", "SLURM_JOB_ID": "12", "SLURM_SUBMIT_HOST": "login2"}
    assert tbs.tunnel_command(6117, env=on_node) == f"ssh -N -J ada@login2 -L 6117:localhost:6117 ada@{host}"
    assert tbs.tunnel_command(6117, "bender", env=on_node) == f"ssh -N -J ada@bender -L 6117:localhost:6117 ada@{host}"
    assert "<login-node>" in tbs.tunnel_command(1, env={"USER": "ada", "SLURM_JOB_ID": "1"})
