"""Smoke test of the benchmarks: every script runs end to end on the CPU at --quick sizes (no timing checks), and
streams each row of its table into $DDPM_BENCH_RESULTS the moment it is measured."""
import json
import subprocess
import sys

import pytest
import torch

from bench.tables import read_rows

from conftest import ROOT, python_env

COLUMNS = {"train_throughput": ("images/s", "vs baseline", "peak memory", "MFU"),
           "sampling": ("s/batch", "images/s", "vs baseline", "peak memory", "MFU"),
           "mnist_end_to_end": ("wall s", "images/s", "speed-up", "peak memory", "accuracy γ=5", "feature-FID γ=5"),
           "quality": ("epochs", "steps x batch", "wall s", "img/s", "acc γ=1", "acc γ=5", "feature-FID γ=5",
                       "acc γ=5 (judge 2)", "feature-FID γ=5 (judge 2)"),
           "cifar_quality": ("budget CPU min", "steps x batch", "CPU s at ckpt", "w", "n", "label accuracy", "feature-FID",
                             "vs DDPM", "accuracy (judge 2)", "feature-FID (judge 2)"),
           "sample_job": ("processes", "wall s", "samples/s (wall)", "rank 0 samples/s", "speed-up (wall)")}

ROWS = {"quality": ("| recipe", "| quickstart", "| quickstart re-drawn by jobs.evaluate"),
        "cifar_quality": ("| training images", "| ddpm:", "| diffusers:", "| ours:")}
STREAMED = {"train_throughput": "training throughput", "sampling": "sampling speed",
            "mnist_end_to_end": "MNIST end to end"}  # bench → the title of its streamed table


def cells(line: str) -> list[str]:
    """The cells of one markdown table row, stripped."""
    return [c.strip() for c in line[2:-2].split(" | ")]


def test_benchmarks_run_on_cpu_quick(mnist_root, untrained_classifier, tmp_path):
    commands = {
        "train_throughput": [sys.executable, "bench/train_throughput.py", "--device", "cpu", "--quick",
                             "--data-root", str(mnist_root)],
        "sampling": [sys.executable, "-m", "bench.sampling", "--device", "cpu", "--quick"],
        "mnist_end_to_end": [sys.executable, "-m", "bench.mnist_end_to_end", "--device", "cpu", "--quick",
                             "--data-root", str(mnist_root), "--classifier", str(untrained_classifier),
                             "--keep", str(tmp_path / "e2e")],
        "quality": [sys.executable, "-m", "bench.quality", "--device", "cpu", "--quick", "--data-root", str(mnist_root),
                    "--classifier", str(untrained_classifier), "--judge", str(untrained_classifier),
                    "--seed", "1", "--objective", "eps", "--keep", str(tmp_path / "quality")],
    }
    # Side by side: each is one thread (python_env), and most of their time is importing torch.
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=python_env(DDPM_BENCH_RESULTS=tmp_path / f"{name}.jsonl"),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    outs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        outs[name] = out
        assert proc.returncode == 0, f"bench {name} failed:\n{out}"
        header = next((line for line in out.splitlines() if line.startswith("| ")), "")
        for column in COLUMNS[name]:
            assert column in header, f"bench {name}: column {column!r} missing from {header!r}"
        assert all(row in out for row in ROWS.get(name, ("| baseline", "| ours"))), out
        assert f"torch {torch.__version__}" in out and "FAILED" not in out
        # Every row streamed as measured: the same cells as the final table's (its last lines), in its order.
        rows = read_rows(tmp_path / f"{name}.jsonl")
        assert {(r["bench"], r["table"]) for r in rows} == ({(name, STREAMED[name])} if name in STREAMED else set())
        if rows:
            final = [line for line in out.splitlines() if line.startswith("| ")][-len(rows):]
            assert [cells(line) for line in final] == [r["cells"] for r in rows]
    # The end-to-end runs are real run dirs, evaluated by the evaluation job.
    for run in ("course", "ours"):
        assert list((tmp_path / "e2e" / run).glob("eval/step_*/metrics.json")), run
    assert not (tmp_path / "e2e" / "ours-warm").exists()  # no compilation on the CPU: no warm-cache row
    # The quality rows: both configs evaluated at every epoch checkpoint by the evaluation job, the
    # quick-start's own final samples read back; the grids exist where the table says.
    for run, steps in (("recipe", (2, 6)), ("ours", (2, 6))):
        for step in steps:
            assert (tmp_path / "quality" / run / "eval" / f"step_{step:09d}" / "samples_gamma_5.png").is_file()
    assert (tmp_path / "quality" / "quickstart" / "samples" / "step_000000004_gamma_5.png").is_file()
    config = {run: json.loads((tmp_path / "quality" / run / "config.json").read_text()) for run in ("recipe", "ours")}
    assert config["recipe"]["train"]["seed"] == config["ours"]["train"]["seed"] == 1  # --seed: the training seed
    assert (config["ours"]["diffusion"]["objective"], config["ours"]["diffusion"]["T"]) == ("eps", 300)  # --objective
    # The second judge re-scores the archived γ=5 samples: the same classifier as judge 1 gives the same scores.
    table = [line for line in outs["quality"].splitlines() if line.startswith("| ")]
    cols = cells(table[0])
    scored = [line for line in table[1:] if line.startswith(("| recipe", "| ours"))]
    assert len(scored) == 4 and "| ours: configs/mnist.yaml (objective eps)" in outs["quality"], outs["quality"]
    for line in scored:
        cell = dict(zip(cols, cells(line)))
        assert cell["acc γ=5 (judge 2)"] == cell["acc γ=5"] and cell["feature-FID γ=5 (judge 2)"] == cell["feature-FID γ=5"]
    # The sampler table on one of those checkpoints: every row evaluated, scored by two judges.
    r = subprocess.run([sys.executable, "-m", "bench.sampler_table", str(tmp_path / "quality" / "ours"), "--guidance", "5",
                        "--convention", "gamma", "--samples", "10", "--seeds", "0", "--rows", "dpmpp_2m:3,ddim:3",
                        "--classifier", str(untrained_classifier), "--judge", str(untrained_classifier),
                        "--keep", str(tmp_path / "table")], cwd=ROOT, env=python_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| dpmpp_2m | 3     | 3   | 0" in r.stdout and "| ddim     | 3     | 3   | 0" in r.stdout, r.stdout


def test_end_to_end_refuses_bad_input(mnist_root, tmp_path):
    """Missing classifier or data, existing --keep dir, unknown device, full sizes on a CPU: exit 2 with a
    one-line error, nothing trained."""
    base = [sys.executable, "-m", "bench.mnist_end_to_end", "--device", "cpu", "--quick", "--data-root", str(mnist_root)]
    (tmp_path / "kept").mkdir()
    marker = tmp_path / "kept" / "mine.txt"
    marker.write_text("keep me")
    cases = [(["--classifier", str(tmp_path / "none.pt")], "no MNIST classifier at"),
             (["--classifier", str(marker), "--keep", str(tmp_path / "kept")], "already exists"),
             (["--classifier", str(marker), "--data-root", str(tmp_path)], "MNIST not found"),
             (["--device", "tpu"], "invalid choice")]
    full_size_on_cpu = [a for a in base if a != "--quick"]
    proc = subprocess.run(full_size_on_cpu, cwd=ROOT, env=python_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "full sizes need a GPU" in proc.stderr.strip().splitlines()[-1], proc.stderr
    for extra, message in cases:
        proc = subprocess.run([*base, *extra], cwd=ROOT, env=python_env(), capture_output=True, text=True)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert marker.read_text() == "keep me" and len(list((tmp_path / "kept").iterdir())) == 1


def test_sample_job_bench_with_one_process(mnist_root, tmp_path):
    """One device (one GPU, here --processes 1) is a normal machine: the one-process row, a line saying that the
    second needs two, exit 0; the row also lands in $DDPM_BENCH_RESULTS, machine-readable."""
    r = subprocess.run([sys.executable, "-m", "bench.sample_job", "--device", "cpu", "--quick", "--processes", "1",
                        "--data-root", str(mnist_root)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=python_env(DDPM_BENCH_RESULTS=tmp_path / "rows.jsonl"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| baseline: python -m jobs.sample" in r.stdout and "| ours" not in r.stdout
    assert "the second row (torchrun over P processes) needs at least 2 cores" in r.stdout
    (row,) = read_rows(tmp_path / "rows.jsonl")
    assert row["table"] == "jobs.sample" and row["values"]["processes"] == 1 and row["values"]["samples_per_s"] > 0


@pytest.mark.slow  # half a minute; its 1-vs-2-process equality is also tests/integration/test_sample.py's
def test_sample_job_bench_runs_on_cpu_quick(mnist_root):
    r = subprocess.run([sys.executable, "-m", "bench.sample_job", "--device", "cpu", "--quick", "--data-root",
                        str(mnist_root)], cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    header = next(line for line in r.stdout.splitlines() if line.startswith("| "))
    assert all(column in header for column in COLUMNS["sample_job"]), header
    assert "outputs of the two rows: identical" in r.stdout and "| ours: torchrun x 2" in r.stdout


@pytest.mark.slow  # 2 minutes of CPU: two classifiers, three probes, four trainings, eight evaluations
def test_cifar_quality_bench_runs_on_cpu_quick(cifar_subset, tmp_path):
    work = tmp_path / "cifar"
    cmd = [sys.executable, "-m", "bench.cifar_quality", "--quick", "--seeds", "0", "--data-root", str(cifar_subset)]
    r = subprocess.run([*cmd, "--keep", str(work)], cwd=ROOT, env=python_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    header = next(line for line in r.stdout.splitlines() if line.startswith("| "))
    assert all(column in header for column in COLUMNS["cifar_quality"]), header
    assert all(row in r.stdout for row in ROWS["cifar_quality"]) and "FAILED" not in r.stdout
    assert "ours wins" in r.stdout
    for recipe in ("ddpm", "diffusers", "ours"):
        for budget in ("0.05", "0.1"):
            assert (work / "pictures" / f"{recipe}-{budget}min-seed0-n20-nfe3.png").is_file()
    # Nested recipes train once with a checkpoint per budget; diffusers' cosine decay once per budget.
    assert sorted(p.name for p in (work / "runs").iterdir()) == [
        "ddpm-seed0-0.05-0.1", "diffusers-seed0-0.05", "diffusers-seed0-0.1", "ours-seed0-0.05-0.1"]
    # --reuse finds everything done: no training, no evaluation (no new log), the same table.
    logs = sorted(p.name for p in (work / "logs").iterdir())
    again = subprocess.run([*cmd, "--reuse", str(work)], cwd=ROOT, env=python_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "| ours:" in again.stdout, again.stdout + again.stderr
    assert sorted(p.name for p in (work / "logs").iterdir()) == logs
    # --score-at scores only the named budget, with its own sample count, from the kept runs (no training).
    more = subprocess.run([*cmd, "--reuse", str(work), "--score-at", "0.1", "--samples", "30", "--per-class", "3",
                           "--recipes", "ours"],
                          cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stdout + more.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in more.stdout.splitlines() if line.startswith("| ours:")]
    assert rows and all(r[1] == "0.1" and r[6] == "30" for r in rows), more.stdout
    new = sorted(set(p.name for p in (work / "logs").iterdir()) - set(logs))
    assert new == ["eval-ours-0.1min-seed0-n30-nfe3.log"], new
    # An EDM part trains and is scored through bench/edm_parts.py, on ours' probe: the same steps as ours.
    part = subprocess.run([*cmd, "--reuse", str(work), "--recipes", "edm-eps"], cwd=ROOT, env=python_env(),
                          capture_output=True, text=True, timeout=300)
    assert part.returncode == 0, part.stdout + part.stderr
    assert "| edm-eps:" in part.stdout and "FAILED" not in part.stdout, part.stdout
    assert not (work / "results" / "probe-edm-eps.json").exists()
    steps = {name: json.loads((work / "results" / f"train-{name}.json").read_text())["0.1"]["step"]
             for name in ("ours-seed0-0.05-0.1", "edm-eps-seed0-0.1")}
    assert abs(steps["ours-seed0-0.05-0.1"] - steps["edm-eps-seed0-0.1"]) <= 1, steps
    assert (work / "pictures" / "edm-eps-0.1min-seed0-n20-nfe3.png").is_file()


# ------------------------------------------------------------------------ bench/edm_parts.py: EDM, one part out
@pytest.fixture
def edm_parts():
    """bench/edm_parts.py's objectives, registered for one test and taken out of the choices after it."""
    from bench import edm_parts
    from ddpm.diffusion.objectives import OBJECTIVES
    before = list(OBJECTIVES)
    edm_parts.register()
    edm_parts.register()  # idempotent
    yield OBJECTIVES
    for name in list(OBJECTIVES):
        if name not in before:
            del OBJECTIVES[name]


def _sigma_of(obj, net_time):
    import math
    lo, hi = math.log(obj.SIGMA_MIN), math.log(obj.SIGMA_MAX)
    return (lo + net_time * (hi - lo)).exp()


def test_edm_parts_each_put_back_one_part_of_the_ddpm_paper(edm_parts):
    from ddpm.diffusion.schedule import NoiseSchedule
    assert [n for n in edm_parts if n.startswith("edm-")] == ["edm-vp-sigma", "edm-unweighted", "edm-eps"]
    gen = torch.Generator().manual_seed(0)
    # The noise levels: exactly the DDPM paper's sigma_t of uniform t, in four equal quartiles.
    vp = edm_parts["edm-vp-sigma"](num_classes=10)
    abar = NoiseSchedule.make("linear", 1000).alpha_bars.double()
    table = ((1 - abar) / abar).sqrt().float()
    s = vp.draw(gen, 8000, "cpu")
    assert torch.isin(s, table).all() and s.min() >= table[0] and s.max() <= table[-1]
    counts = torch.bincount(vp.bucket(s), minlength=4)
    assert counts.sum() == 8000 and (counts - 2000).abs().max() < 200, counts
    # The weighting: EDM's per-sample loss times (c_out / sigma_data)^2, the same net and draws.
    edm, flat = edm_parts["edm"](num_classes=10), edm_parts["edm-unweighted"](num_classes=10)
    net = lambda x, t, y: 0.3 * x + t.reshape(-1, 1, 1, 1)  # noqa: E731 - any fixed function of the inputs
    x0, noise = torch.randn(6, 3, 4, 4, generator=gen), torch.randn(6, 3, 4, 4, generator=gen)
    y, drop, sigma = torch.arange(6), torch.zeros(6, dtype=torch.bool), edm.draw(gen, 6, "cpu")
    _, c_out, _ = edm.coefficients(sigma, 4)
    torch.testing.assert_close(flat.loss(net, x0, y, noise, sigma, drop),
                               edm.loss(net, x0, y, noise, sigma, drop) * (c_out.flatten() / 0.5) ** 2)


def test_edm_eps_is_exact_for_the_ideal_noise_predictor_of_gaussian_data(edm_parts):
    """x0 ~ N(0, sd^2) per pixel, x = x0 + sigma n: E[n | x] = sigma x / (sd^2 + sigma^2), whose eps loss is
    Var(n | x) = sd^2 / (sd^2 + sigma^2), and the denoiser hands the samplers that same eps."""
    obj, sd = edm_parts["edm-eps"](num_classes=0), 0.5
    gen = torch.Generator().manual_seed(1)

    def ideal(x_in, net_time, y):  # the net sees c_in x = x / sqrt(sigma^2 + sd^2) and c_noise
        sigma = _sigma_of(obj, net_time.double()).reshape(-1, 1, 1, 1)
        return (sigma * x_in.double() / (sigma ** 2 + sd ** 2).sqrt()).float()

    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0])
    x0, noise = sd * torch.randn(4, 1, 64, 64, generator=gen), torch.randn(4, 1, 64, 64, generator=gen)
    loss = obj.loss(ideal, x0, None, noise, sigma, torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(loss, sd ** 2 / (sd ** 2 + sigma ** 2), rtol=0.05, atol=0)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    torch.testing.assert_close(obj.denoiser(ideal)(x, sigma, None),
                               sigma.reshape(-1, 1, 1, 1) * x / (sd ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2),
                               rtol=1e-4, atol=1e-5)


def test_edm_parts_train_through_the_jobs(cifar_subset, tmp_path):
    """`python -m bench.edm_parts jobs.train ...` trains with a part's objective; without a module it says how."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench.edm_parts", "jobs.train", "--config", "configs/cifar10.yaml",
           f"data.root={cifar_subset}", "train.device=cpu", "log.tensorboard=false", "model.base=16",
           "model.num_groups=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "train.batch_size=8",
           "train.steps=2", "sample.per_class=1", "sample.steps=2", "diffusion.objective=edm-eps",
           "--run-dir", str(run)]
    r = subprocess.run(cmd, cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((run / "config.json").read_text())["diffusion"]["objective"] == "edm-eps"
    bare = subprocess.run([sys.executable, "-m", "bench.edm_parts"], cwd=ROOT, env=python_env(),
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "usage: python -m bench.edm_parts MODULE" in bare.stderr
