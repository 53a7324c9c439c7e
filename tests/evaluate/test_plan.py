"""ddpm.evaluate.plan / loaded_run / sampling_choice / sample_sets: what the jobs ask for becomes frozen
records, every default resolved, nothing written (runs with random weights: no sampler runs here)."""
import ast
import dataclasses
import re

import pytest
import torch

from ddpm.config import load_config
from ddpm.diffusion.from_config import SAMPLERS, Sampling
from ddpm.diffusion.objectives import OBJECTIVES
from ddpm.errors import UserError
from ddpm.evaluate.loaded_run import load_run
from ddpm.evaluate.plan import EvaluationArgs, plan_evaluation
from ddpm.evaluate.sample_sets import SamplesArgs, plan_samples
from ddpm.evaluate.sampling_choice import choose_sampling, fast_sampler, runs_every_step, table_steps, takes_eta
from ddpm.nets.registry import build_net
from ddpm.run.checkpoints import CheckpointManager
from ddpm.run.rundir import read_run_config, write_config

from conftest import ROOT, write_tiny_config


@pytest.fixture(scope="module")
def make_run(tmp_path_factory, mnist_root):
    """make_run(name, overrides) → the run dir of a checkpoint at step 5 with random weights."""
    d = tmp_path_factory.mktemp("plan")
    write_tiny_config(d, mnist_root)

    def make(name, overrides=()):
        cfg = load_config(d / "tiny.yaml", list(overrides))
        write_config(d / name, cfg)
        torch.manual_seed(0)
        net = build_net(cfg.model["arch"], **cfg.net_kwargs())
        CheckpointManager(d / name / "checkpoints").save(5, {"model": net.state_dict(), "ema": net.state_dict(),
                                                            "optimizer": {}, "step": 5, "config": cfg.to_dict()})
        return d / name
    return make


def _files(path):
    return sorted((str(p), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_an_evaluation_is_frozen_records_with_its_fid_sets_resolved_in_planning(make_run, untrained_classifier):
    run_dir = make_run("eps")
    before = _files(run_dir)
    ev = plan_evaluation(EvaluationArgs(str(run_dir), device="cpu", only="grids", guidance="1,3,3", seed=7,
                                        classifier=str(untrained_classifier), fid_samples=12))
    assert _files(run_dir) == before  # planning writes nothing
    assert ev.parts == ("grids", "fid") and ev.seed == 7 and ev.run.step == 5 and ev.run.ema
    assert ev.run.objective.kind == "generative" and ev.run.conditional
    assert ev.sampling.scales == (1.0, 3.0) and ev.display_scale == 3.0
    assert ev.sampling.main == Sampling("ddim", 5, 3.0, "gamma", False, 0.0)  # the config's sampler and steps
    assert ev.sampling.fast == Sampling("ddim", 20, 3.0, "gamma", False, 0.0)
    assert [s.sampling.guidance for s in ev.fid_sets] == [1.0, 3.0]
    assert [s.out.name for s in ev.fid_sets] == [f"step_000000005_gamma_{g}_ddim5_n12_seed7.h5" for g in (1, 3)]
    assert all(s.num == 12 and s.seed == 7 and not s.finished for s in ev.fid_sets)
    assert ev.scorers.classifier is not None and ev.scorers.inception is None and ev.scorers.note == ""
    for record, field in ((ev, "parts"), (ev.run, "step"), (ev.sampling, "scales"), (ev.scorers, "note"),
                          (ev.fid_sets[0], "seed")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, field, None)


def test_sampling_defaults_conventions_and_eta(make_run):
    run_dir = make_run("ddpm", ["sample.sampler=ddpm", "sample.steps=0"])
    run = load_run(run_dir, read_run_config(run_dir), device="cpu")
    choice = choose_sampling(run, fast_steps=7)
    assert (choice.main.sampler, choice.main.steps) == ("ddim", 7) and "ddim instead of the config's ddpm" in choice.note
    assert choose_sampling(run, sampler="ddpm").main.steps == 50 and choose_sampling(run, sampler="ddpm").note == ""
    w = choose_sampling(run, convention="w")  # the config's [1, 3] in gamma is [0, 2] in w
    assert w.scales == (0.0, 2.0) and w.at(0.0) == dataclasses.replace(w.main, guidance=0.0)
    stochastic = choose_sampling(run, sampler="ddim", steps=10, eta=0.5)
    assert (stochastic.main.eta, stochastic.fast.eta) == (0.5, 0.0)  # the fast sampling stays deterministic
    for kwargs, message in ((dict(eta=0.5, sampler="ddpm"), "--eta 0.5 is DDIM's stochasticity"),
                            (dict(eta=1.5), "--eta must be in [0, 1]"), (dict(steps=0), "--steps must be >= 1"),
                            (dict(guidance=[float("nan")], convention="beta"), "unknown --convention 'beta'")):
        with pytest.raises(UserError, match=re.escape(message)):
            choose_sampling(run, **kwargs)


def test_a_sample_set_reuses_the_sampling_resolver_with_one_scale(make_run):
    run_dir = make_run("one")
    samples = plan_samples(SamplesArgs(str(run_dir), num=30, guidance=5.0, device="cpu", eta=0.25, sampler="ddim"))
    assert samples.sampling == Sampling("ddim", 5, 5.0, "gamma", False, 0.25)
    assert samples.out.name == "step_000000005_gamma_5_ddim5_eta0.25_n30_seed1234.h5"
    assert samples.settings["eta"] == 0.25 and samples.settings["guidance"] == 5.0
    default = plan_samples(SamplesArgs(str(run_dir), num=30, device="cpu"))
    assert default.sampling.guidance == 3.0 and "eta" not in default.settings  # the median of sample.guidance
    assert default.out.name == "step_000000005_gamma_3_ddim5_n30_seed1234.h5"  # the name files always had


def test_an_unconditional_net_samples_at_the_neutral_scale_of_either_convention(make_run):
    run_dir = make_run("uncond", ["model={arch: cs180_time_unet, hidden: 8}", "sample.guidance=[1.0]"])
    samples = plan_samples(SamplesArgs(str(run_dir), num=4, convention="w", device="cpu"))
    assert samples.sampling.guidance == 0.0 and samples.settings["guidance"] is None
    with pytest.raises(UserError, match="there is no guidance grid for --guidance 2; drop --guidance"):
        plan_samples(SamplesArgs(str(run_dir), num=4, guidance=2.0, device="cpu"))
    den = make_run("den", ["model={arch: cs180_denoiser, hidden: 8}", "diffusion.objective=denoiser",
                           "sample.guidance=[1.0]"])
    with pytest.raises(UserError, match="is a denoiser run: it does not generate samples"):
        plan_samples(SamplesArgs(str(den), num=4, device="cpu"))


def test_the_evaluation_never_names_a_sampler():
    """What a sampler is (its steps, its network evaluations, its eta) comes from ddpm.diffusion.from_config: a
    new sampler there needs no change here, as no module outside ddpm/diffusion compares objective names."""
    jobs = [ROOT / "jobs" / "evaluate.py", ROOT / "jobs" / "sample.py"]
    files = sorted((ROOT / "ddpm" / "evaluate").glob("*.py")) + jobs
    wrong = [f"{p.relative_to(ROOT)}:{n.lineno} {n.value!r}" for p in files for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Constant) and n.value in SAMPLERS]
    assert not wrong, "sampler names in the evaluation: " + ", ".join(wrong)


@pytest.mark.parametrize("objective", [o for o, cls in OBJECTIVES.items() if cls.samplers])
def test_every_sampler_of_every_objective_plans_an_evaluation(make_run, objective):
    """Each sampler of from_config.SAMPLERS that fits the objective: its main and fast sampling, steps-table rows and
    name of its sample files resolve (nothing runs)."""
    run_dir = make_run(f"all_{objective}", [f"diffusion.objective={objective}",
                                            f"sample.sampler={OBJECTIVES[objective].samplers[-1]}"])
    run = load_run(run_dir, read_run_config(run_dir), device="cpu")
    assert not runs_every_step(fast_sampler(run.objective))
    for sampler in run.objective.samplers:
        choice = choose_sampling(run, sampler=sampler, fast_steps=7)
        assert choice.main.sampler == sampler and not runs_every_step(choice.fast.sampler)
        assert choice.main.steps == (50 if runs_every_step(sampler) else choice.main.steps) >= 1
        rows = table_steps(run.cfg, sampler)
        assert rows and all(1 <= k for k in rows) and (rows == (50,) if runs_every_step(sampler) else True)
        samples = plan_samples(SamplesArgs(str(run_dir), num=4, sampler=sampler, device="cpu",
                                           eta=0.5 if takes_eta(sampler) else None))
        assert f"_{sampler}{samples.sampling.steps}" in samples.out.name
    assert [s for s in SAMPLERS if takes_eta(s)] == ["ddim"] and [s for s in SAMPLERS if runs_every_step(s)] == ["ddpm"]
