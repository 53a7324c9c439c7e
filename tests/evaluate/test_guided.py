"""jobs.evaluate and jobs.sample with guidance other than the run's classifier-free guidance (ddpm.evaluate.guides,
ddpm.evaluate.guided) and with the training job's held-out loss and checkpoints/best, on a tiny class-conditional
MNIST run of two 10-step epochs on 320 images and a noisy classifier trained by jobs.train the same way (CPU)."""
import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.config import load_config
from ddpm.nets.registry import build_net
from ddpm.run.checkpoints import CheckpointManager
from ddpm.run.metrics_log import read_metrics
from ddpm.run.rundir import write_config
from jobs.evaluate import main as evaluate
from jobs.evaluate import parse_args
from jobs.sample import main as sample
from jobs.train import main as train

from conftest import write_small_mnist, write_tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(name="small", train="{batch_size: 32, epochs: 2, lr: 2.0e-3, ema_decay: 0.99, device: cpu, grad_clip: 1.0}",
             log="{every: 5, progress: lines, test_images: 40}",
             checkpoint="{every: 1000, every_epochs: [1], keep_last: 1, best: true}",
             sample="{sampler: ddim, steps: 5, guidance: [1.0, 3.0], per_class: 2}")
CLASSIFIER = ["model={arch: noisy_classifier, base: 8}", "diffusion.objective=classifier", "sample.guidance=[1.0]"]
FAST = ["--device", "cpu", "--metric-samples", "20", "--table-samples", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, untrained_classifier):
    """{config, run, clf, fcnn, d}: the conditional run (checkpoints/best moved to epoch 1, step 10, so that it is
    not the latest), the noisy classifier run, the evaluation classifier."""
    d = tmp_path_factory.mktemp("guided")
    config = write_tiny_config(d, write_small_mnist(d / "data", 320, 100), "small.yaml", **SMALL)
    assert train(["--config", str(config), "--run-dir", str(d / "run")]) == 0
    assert train(["--config", str(config), "--run-dir", str(d / "clf"), "train.epochs=1", *CLASSIFIER]) == 0
    CheckpointManager(d / "run" / "checkpoints").set_best(10)
    return {"config": config, "run": d / "run", "clf": d / "clf", "fcnn": str(untrained_classifier), "d": d}


def fake_run(world, name, overrides):
    """A run dir with random weights at step 5 (what is checked against the guided run is its config)."""
    cfg = load_config(world["config"], overrides)
    run_dir = world["d"] / name
    write_config(run_dir, cfg)
    torch.manual_seed(0)
    net = build_net(cfg.model["arch"], **cfg.net_kwargs())
    CheckpointManager(run_dir / "checkpoints").save(5, {"model": net.state_dict(), "ema": None, "optimizer": {},
                                                        "step": 5, "config": cfg.to_dict()})
    return run_dir


def metrics(run, step):
    return json.loads((run / "eval" / f"step_{step:09d}" / "metrics.json").read_text())


def group(run, name):
    with h5py.File(run / "samples.h5", "r") as f:
        return f[name]["images"][()].astype(int), dict(f[name].attrs)


def test_negative_guidance_lists_parse_as_written():
    a = parse_args(["RUN", "--guidance", "-1,0,1", "--cg-scale", "-2", "--steps", "5"])
    assert (a.guidance, a.cg_scales, a.steps) == ("-1,0,1", "-2", 5)
    assert parse_args(["RUN", "--guidance=-0.5"]).guidance == "-0.5"
    assert parse_args(["RUN", "--guidance", "-1", "--only", "grids"]).guidance == "-1"
    from jobs.sample import parse_args as sample_args
    assert sample_args(["RUN", "--num", "4", "--guidance", "-1", "--convention", "w"]).guidance == -1.0


def test_a_new_sampler_needs_no_change_in_the_evaluation(world):
    """dpmpp_2m (added to ddpm.diffusion after the evaluation was written): GIF frames, the steps table at equal
    network evaluations, the sampler named in the records and the sample file names."""
    run = world["run"]
    assert evaluate([str(run), "--sampler", "dpmpp_2m", "--steps", "6", "--only", "gifs,steps", *FAST]) == 0
    m = metrics(run, 20)
    assert (m["sampler"]["name"], m["sampler"]["steps"], m["sections"]["gifs"]["frames"]) == ("dpmpp_2m", 6, 7)
    assert ("dpmpp_2m", 20, 20) in [(r["sampler"], r["steps"], r["evaluations"]) for r in m["sections"]["steps"]["rows"]]
    assert sample([str(run), "--num", "4", "--sampler", "dpmpp_2m", "--steps", "6", "--device", "cpu"]) == 0
    assert (run / "samples" / "step_000000020_gamma_3_dpmpp_2m6_n4_seed1234.h5").is_file()


def test_checkpoint_best_and_the_held_out_loss_per_epoch(world, capsys):
    run = world["run"]
    assert evaluate([str(run), "--checkpoint", "best", "--only", "curves", "--device", "cpu"]) == 0
    m = metrics(run, 10)  # checkpoints/best names step 10, the latest is step 20
    assert (m["checkpoint"]["step"], m["checkpoint"]["best_step"]) == (10, 10)
    logged = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "test_loss" in r}
    epochs = m["sections"]["curves"]["epochs"]
    assert [(e["epoch"], e["step"], e["complete"]) for e in epochs] == [(1, 10, True), (2, 20, True)]
    assert [e["test_loss"] for e in epochs] == [logged[10]["test_loss"], logged[20]["test_loss"]]
    assert [e["train_loss"] for e in epochs] == [logged[10]["epoch_loss"], logged[20]["epoch_loss"]]
    report = (run / "eval" / "step_000000010" / "report.md").read_text()
    assert "| epoch | last step | training loss | held-out loss |" in report
    assert "| 1 | 10 | " in report and "checkpoints/best" in report and "final held-out loss" in report
    assert Image.open(run / "eval" / "step_000000010" / "loss_curves.png").size[0] >= 600
    assert sample([str(run), "--num", "10", "--checkpoint", "best", "--device", "cpu", "--out", "best"]) == 0
    with h5py.File(run / "samples" / "best.h5", "r") as f:
        assert f["samples"].attrs["step"] == 10


def test_classifier_guidance_is_compared_with_classifier_free_guidance(world):
    run, clf = world["run"], world["clf"]
    assert evaluate([str(run), "--only", "cg", "--classifier-guidance", str(clf), "--cg-scale", "0,100",
                     "--guidance", "-1,0,2", "--convention", "w", "--classifier", world["fcnn"], *FAST]) == 0
    m = metrics(run, 20)
    x = m["sections"]["classifier_guidance"]
    assert [r["scale"] for r in x["rows"]] == [0.0, 100.0] and [r["scale"] for r in x["cfg_rows"]] == [-1, 0, 2]
    assert all(r["n"] == 20 and r["ms_per_image"] > 0 and 0 <= r["accuracy"] <= 1 for r in x["rows"])
    assert [p["cg_scale"] for p in x["matched"]] == [0.0, 100.0]
    assert all(p["cfg_scale"] in (-1, 0, 2) and p["accuracy_gap"] >= 0 for p in x["matched"])
    assert m["classifier_guidance"]["classifier_guidance"] == str(clf) and m["classifier_guidance"]["cg_step"] == 10
    # Scale 0 is the unconditional prediction, as classifier-free guidance at w = -1 (same noise, same model);
    # scale 100 moves the samples far from it.
    unguided, attrs = group(run, "eval/step_000000020/cg_0")
    guided, _ = group(run, "eval/step_000000020/cg_100")
    cfg_uncond, _ = group(run, "eval/step_000000020/w_-1")
    assert np.abs(unguided - cfg_uncond).max() <= 1 and np.abs(guided - unguided).mean() > 5
    assert (attrs["classifier_guidance"], attrs["cg_scale"], attrs["per_class"]) == (str(clf), 0.0, 2)
    figs = {f["file"]: f for f in x["figures"]}
    assert set(figs) == {"cg_grid.png", "cg_vs_cfg.png"}
    assert (figs["cg_grid.png"]["rows"], figs["cg_grid.png"]["cols"]) == (10, 5)
    assert figs["cg_grid.png"]["col_labels"] == ["CFG w=-1", "CFG w=0", "CFG w=2", "CG s=0", "CG s=100"]
    report = (run / "eval" / "step_000000020" / "report.md").read_text()
    assert "## Classifier guidance vs classifier-free guidance" in report and "Matched label accuracy" in report
    assert "](cg_vs_cfg.png)" in report


def test_classifier_guidance_of_an_unconditional_run(world):
    uncond = fake_run(world, "uncond", ["model={arch: cs180_time_unet, hidden: 8}", "sample.guidance=[1.0]"])
    assert evaluate([str(uncond), "--only", "cg", "--classifier-guidance", str(world["clf"]), "--cg-scale", "2",
                     "--classifier", world["fcnn"], *FAST]) == 0
    x = metrics(uncond, 5)["sections"]["classifier_guidance"]
    assert [r["scale"] for r in x["rows"]] == [2.0] and x["cfg_rows"] == [] and x["matched"] == []
    assert x["rows"][0]["n"] == 20 and x["per_class"] == 2  # --metric-samples 20: 2 per class it guides toward


def test_class_mixture_sweep(world):
    run = world["run"]
    assert evaluate([str(run), "--only", "mixture", "--mix", "3:1,8:1", "--classifier", world["fcnn"], *FAST]) == 0
    x = metrics(run, 20)["sections"]["mixture"]
    assert x["mix"] == "3:1,8:1" and x["classes"] == [3, 8]
    assert [r["weights"] for r in x["rows"]] == [[2.0, 0.0], [1.6667, 0.3333], [1.3333, 0.6667], [1.0, 1.0],
                                                  [0.6667, 1.3333], [0.3333, 1.6667], [0.0, 2.0]]
    assert x["rows"][3]["mix"] == "3:1,8:1" and all(r["n"] == 4 and 0 <= r["share_a"] <= 1 for r in x["rows"])
    figs = {f["file"]: f for f in x["figures"]}
    assert set(figs) == {"mixture_sweep.png", "mixture_shares.png"}
    assert (figs["mixture_sweep.png"]["rows"], figs["mixture_sweep.png"]["cols"]) == (4, 7)
    assert "## Class mixture" in (run / "eval" / "step_000000020" / "report.md").read_text()


def test_jobs_sample_with_classifier_guidance_and_a_mixture(world):
    run, clf = world["run"], world["clf"]
    assert sample([str(run), "--num", "20", "--mix", "3:1,8:1", "--device", "cpu"]) == 0
    assert sample([str(run), "--num", "20", "--classifier-guidance", str(clf), "--cg-scale", "2", "--device",
                   "cpu"]) == 0
    with h5py.File(run / "samples" / "step_000000020_mix3w1_8w1_ddim5_n20_seed1234.h5", "r") as f:
        a = dict(f["samples"].attrs)
        assert (a["mix"], a["conditional"], a["labels"]) == ("3:1,8:1", False, "none")
        assert set(f["samples/labels"][()]) == {-1}
    with h5py.File(run / "samples" / "step_000000020_cg_2_ddim5_n20_seed1234.h5", "r") as f:
        a = dict(f["samples"].attrs)
        assert (a["classifier_guidance"], a["cg_scale"], a["labels"]) == (str(clf), 2.0, "i mod classes")
        assert list(f["samples/labels"][()]) == [i % 10 for i in range(20)]


def _snapshot(path):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_bad_guidance_inputs_are_one_line_exit_2_and_write_nothing(world, capsys):
    run, clf, d = str(world["run"]), str(world["clf"]), world["d"]
    other_t = fake_run(world, "clf_t40", [*CLASSIFIER, "diffusion.T=40"])
    other_data = fake_run(world, "clf_norm", [*CLASSIFIER, "data.normalize=[0.5, 0.5]"])
    flow = fake_run(world, "flow", ["diffusion.objective=rectified_flow", "sample.sampler=euler"])
    uncond = fake_run(world, "uncond_bad", ["model={arch: cs180_time_unet, hidden: 8}", "sample.guidance=[1.0]"])
    empty = d / "clf_empty"
    write_config(empty, load_config(world["config"], CLASSIFIER))
    cg = "--classifier-guidance"
    cases = [
        ([run, cg, str(d / "nowhere")], "is not a run directory"),
        ([run, cg, run], "not a noisy classifier (diffusion.objective=classifier)"),
        ([run, cg, str(other_t)], "another noise schedule than this run (diffusion.T 40 vs 50)"),
        ([run, cg, str(other_data)], "was trained on mnist (data.normalize [0.5, 0.5])"),
        ([run, cg, str(empty)], "has no checkpoint yet"),
        ([str(flow), cg, clf], "continuous noise levels"),
        ([run, cg, clf, "--cg-scale", "1,x"], "--cg-scale '1,x' is not a comma-separated list"),
        ([run, cg, clf, "--cg-scale", "-1"], "must be >= 0"),
        ([run, "--cg-scale", "3"], "pass --classifier-guidance RUN_DIR too"),
        ([run, "--only", "cg"], "pass --classifier-guidance RUN_DIR"),
        ([run, "--mix", "3:1"], "names one class"),
        ([run, "--mix", "3:1,12:1"], "mnist has no class '12'"),
        ([run, "--mix", "3:1,8:a"], "is not CLASS:WEIGHT"),
        ([run, "--mix", "3:1,3:2"], "names a class twice"),
        ([str(uncond), "--mix", "3:1,8:1"], "needs a class-conditional run"),
        ([run, "--checkpoint", "7"], "no checkpoint for step 7"),
    ]
    samples = [
        ([run, "--num", "10", cg, run], "not a noisy classifier"),
        ([run, "--num", "10", cg, str(other_t)], "another noise schedule"),
        ([run, "--num", "10", "--mix", "3:1,8:1", cg, clf], "different kinds of guidance"),
        ([run, "--num", "10", "--cg-scale", "2"], "pass --classifier-guidance RUN_DIR too"),
        ([str(uncond), "--num", "10", "--mix", "3:1,8:1"], "needs a class-conditional run"),
    ]
    before = _snapshot(d)
    for job, argv, message in [(evaluate, a, m) for a, m in cases] + [(sample, a, m) for a, m in samples]:
        assert job(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert _snapshot(d) == before
