import json
import re

import pytest

from ddpm.config import Config, from_dict, load_config, parse_override
from ddpm.errors import UserError

from conftest import ROOT, SHARED

ALL_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_every_shipped_config_validates():
    names = {p.name for p in ALL_CONFIGS}
    assert {"mnist.yaml", "cifar10.yaml", "cs180_mnist.yaml", "cs180_denoiser.yaml", "conditional_ddpm.yaml",
            "bonn_mnist.yaml", "bonn_cifar10.yaml", "rectified_flow_mnist.yaml",
            "noisy_classifier_mnist.yaml", "cs180_time_mnist.yaml", "schedules_mnist.yaml"} <= names
    for p in ALL_CONFIGS:
        cfg = load_config(p)
        assert isinstance(cfg, Config)
        assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # config.json round trip


def test_recipe_values():
    cs180 = load_config(ROOT / "configs/recipes/cs180_mnist.yaml")
    assert cs180.model == {"arch": "cs180_class_unet", "hidden": 64, "in_channels": 1, "image_size": 28, "T": 300,
                           "num_classes": 10}
    assert (cs180.train.batch_size, cs180.train.epochs, cs180.train.lr) == (128, 20, 1e-3)
    assert cs180.train.lr_gamma ** 20 == pytest.approx(0.1)
    assert cs180.diffusion.p_uncond == 0.1
    cd = load_config(ROOT / "configs/recipes/conditional_ddpm.yaml")
    assert (cd.diffusion.T, cd.diffusion.beta_start, cd.diffusion.beta_end) == (400, 1e-4, 0.02)
    assert cd.data.normalize == [0.1307, 0.3081] and cd.sample.convention == "w"
    assert load_config(ROOT / "configs/recipes/cs180_denoiser.yaml").diffusion.sigma == 0.5
    c10 = load_config(ROOT / "configs/cifar10.yaml", device="cuda")  # the file itself, not its on_cpu section
    assert c10.model["attn_resolutions"] == [16] and c10.model["ch_mult"] == [1, 2, 2, 2]


def test_overrides_parse_types_and_replace_run_length():
    cfg = load_config(ROOT / "configs/mnist.yaml", ["train.lr=2e-4", "train.steps=10", "sample.guidance=[0, 3]",
                                                    "data.hflip=true", "model.hidden=32"])
    assert cfg.train.lr == 2e-4 and cfg.train.steps == 10 and cfg.train.epochs is None
    assert cfg.sample.guidance == [0, 3] and cfg.data.hflip is True and cfg.model["hidden"] == 32
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize("override, match", [
    ("train.lr=", "malformed override"),
    ("=3", "malformed override"),
    ("train.lr", "malformed override"),
    ("train.lrr=1", r"unknown config key train.lrr \(did you mean 'lr'\?\)"),
    ("trian.lr=1", r"did you mean 'train'"),
    ("model.hiden=8", r"model.hiden .*did you mean 'hidden'"),
    ("train.batch_size=abc", "train.batch_size must be a number"),
    ("train.batch_size=2.5", "must be an integer"),
    ("train.compile=yes please", "true or false"),
    ("train.lr=-1", r"train.lr must be in \(0, inf\)"),
    ("diffusion.p_uncond=1.5", r"diffusion.p_uncond must be in \[0, 1\]"),
    ("diffusion.objective=score", "must be one of eps, x0"),
    ("model.arch=unet9", "choose one of"),
    ("model.T=5", "conflicts with the value derived"),
    ("sample.steps=301", "exceeds diffusion.T=300"),
    ("sample.sampler=euler", "does not fit diffusion.objective=eps"),
    ("sample.guidance=[a,b]", r"sample.guidance must be a list of numbers, got \['a', 'b'\]"),
    ("sample.guidance=[1, .nan]", "sample.guidance must be a list of numbers"),
    ("train.betas=[0.9]", "train.betas must hold exactly 2 numbers"),
    ("train.lr_milestones=[true]", "train.lr_milestones must be a list of numbers"),
    ("data.normalize=[0.5, x]", "data.normalize must be a list of numbers"),
    ("train.collective_timeout_s=1", r"train.collective_timeout_s must be in \[10, inf\)"),
    ("log.sample_every_epochs=[0, 5]", r"log.sample_every_epochs must be a period \(5\), epochs \(\[1, 5, 10\]\)"),
    ("checkpoint.every_epochs=abc", "checkpoint.every_epochs must be a period"),
    ("log.gif_every_epochs=[1, every x]", "log.gif_every_epochs must be a period"),
    ("log.test_every_epochs=2.5", "log.test_every_epochs must be a period"),
    ("log.test_images=0", r"log.test_images must be in \[1, inf\)"),
    ("sample.steps=50", "sample.steps=50: the ddpm sampler runs all T=300 steps; set sample.steps=0 or"),
    ("train.epochs=3", None),  # fine: replaces nothing wrong
])
def test_bad_values_are_one_line_errors(override, match):
    if match is None:
        assert load_config(ROOT / "configs/mnist.yaml", [override]).train.epochs == 3
        return
    with pytest.raises(UserError, match=match) as e:
        load_config(ROOT / "configs/mnist.yaml", [override])
    assert "\n" not in str(e.value)


def test_epoch_schedules_take_a_period_a_list_or_both():
    def sched(value):
        return load_config(ROOT / "configs/mnist.yaml", [f"log.sample_every_epochs={value}"]).log.sample_every_epochs
    assert sched("5") == sched("every 5") == sched("[every 5]") == ["every 5"]
    assert sched("[20, 1, 5, 10, 15, 5]") == [1, 5, 10, 15, 20]
    assert sched("[1, every 5, every 2]") == [1, "every 2", "every 5"]
    assert sched("0") == sched("null") == sched("[]") == []
    cfg = load_config(ROOT / "configs/mnist.yaml")
    assert (cfg.log.test_every_epochs, cfg.log.gif_every_epochs, cfg.checkpoint.every_epochs) == (["every 1"], [], [])
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("overrides, match", [
    (["checkpoint.best=true", "log.test_every_epochs=0"], "checkpoint.best=true needs the held-out loss"),
    (["model={arch: cs180_denoiser}", "diffusion.objective=denoiser", "sample.guidance=[1.0]",
      "log.gif_every_epochs=1"],
     "a denoiser run samples nothing to animate"),
])
def test_combinations_of_the_epoch_options(overrides, match):
    with pytest.raises(UserError, match=match) as e:
        load_config(ROOT / "configs/mnist.yaml", overrides)
    assert "\n" not in str(e.value)


def test_recipes_set_what_their_assignment_asks():
    def recipe(name):
        return load_config(ROOT / "configs/recipes" / name)
    for name in ("cs180_mnist.yaml", "cs180_time_mnist.yaml"):  # grids (and models) at epochs 1, 5, 10, 15, 20
        cfg = recipe(name)
        assert cfg.log.sample_every_epochs == cfg.checkpoint.every_epochs == [1, 5, 10, 15, 20]
        assert (cfg.diffusion.T, cfg.train.epochs, cfg.sample.sampler, cfg.sample.ema) == (300, 20, "ddpm", False)
    assert recipe("cs180_time_mnist.yaml").model["arch"] == "cs180_time_unet"
    assert "num_classes" not in recipe("cs180_time_mnist.yaml").model  # unconditional
    den = recipe("cs180_denoiser.yaml")  # sigma = 0.5 on images in [0, 1], grids after epochs 1 and 5
    assert (den.data.normalize, den.diffusion.sigma, den.log.sample_every_epochs) == ([0.0, 1.0], 0.5, [1, 5])
    cd = recipe("conditional_ddpm.yaml")  # train and test loss per epoch on the whole test split, the best
    assert (cd.log.test_every_epochs, cd.log.test_images, cd.checkpoint.best) == (["every 1"], 10000, True)
    assert cd.log.sample_every_epochs == ["every 1"] and 2.0 in cd.sample.guidance
    bonn = (("bonn_mnist.yaml", 5, 5, [0.0, 1.0, 3.0]), ("bonn_cifar10.yaml", 10, 20, [1.0, 3.0]))
    for name, every, gif, scales in bonn:
        cfg = recipe(name)  # DDPM (algorithm 2), 4 per class, w as in the exercise, grids/models/GIFs per epochs
        s = cfg.sample
        assert (s.sampler, s.steps, s.per_class, s.convention) == ("ddpm", 0, 4, "w")
        assert cfg.sample.guidance == scales and cfg.model == {**cfg.model, "arch": "res_unet", "channels": 32}
        assert cfg.log.sample_every_epochs == cfg.checkpoint.every_epochs == [f"every {every}"]
        assert cfg.log.gif_every_epochs == [f"every {gif}"]
    assert recipe("noisy_classifier_mnist.yaml").checkpoint.best
    assert {load_config(ROOT / "configs/recipes/schedules_mnist.yaml", [f"diffusion.schedule={k}"]).diffusion.schedule
            for k in ("linear", "cosine", "quadratic")} == {"linear", "cosine", "quadratic"}
    sweep = (ROOT / "slurm/sweeps/schedules.txt").read_text().splitlines()
    assert [ln for ln in sweep if ln and not ln.startswith("#")] == [
        "diffusion.schedule=linear", "diffusion.schedule=cosine", "diffusion.schedule=quadratic"]


def test_every_recipe_header_names_its_course_and_deliverables():
    courses = SHARED / "courses"
    named = []
    for path in sorted((ROOT / "configs/recipes").glob("*.yaml")):
        header = path.read_text().split("\nname:")[0]
        if "Course:" not in header:
            continue  # not a course recipe (e.g. a paper's)
        found = re.search(r"\.\./shared/courses (\d{3}(?:, \d{3})*)", header)
        assert found and ("Deliverables" in header or "Reproduces" in header), path.name
        for number in found.group(1).split(", "):
            named.append(number)
            if courses.is_dir():  # the document it names is there
                assert list(courses.glob(f"{number}_*.txt")), (path.name, number)
    assert len(set(named)) == 5, named  # every course document has a recipe


def test_guidance_needs_a_conditional_model():
    with pytest.raises(UserError, match="needs a class-conditional model"):
        load_config(ROOT / "configs/recipes/bonn_mnist.yaml", ["model.num_classes=0"])
    cfg = load_config(ROOT / "configs/recipes/bonn_mnist.yaml", ["model.num_classes=0", "sample.guidance=[1.0]"])
    assert cfg.model["num_classes"] == 0


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  lr: [1, 2\n  batch_size: 3\n")
    with pytest.raises(UserError, match=r"YAML syntax error in .*bad.yaml at line \d+"):
        load_config(bad)
    both = tmp_path / "both.yaml"
    both.write_text("model: {arch: cs180_class_unet}\ntrain: {epochs: 1, steps: 3}\n")
    with pytest.raises(UserError, match="exactly one of train.epochs and train.steps"):
        load_config(both)


def test_on_cpu_section_applies_on_a_cpu_only_and_overrides_still_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {arch: cs180_class_unet, hidden: 8}\ntrain: {batch_size: 512, epochs: 2, lr: 2.0e-3}\n"
                    "on_cpu: {train: {batch_size: 64, steps: 7}, log: {every: 3}}\n")
    gpu, cpu = load_config(path, device="cuda"), load_config(path, device="cpu")
    assert (gpu.train.batch_size, gpu.train.epochs, gpu.train.steps, gpu.log.every) == (512, 2, None, 50)
    assert (cpu.train.batch_size, cpu.train.epochs, cpu.train.steps, cpu.log.every) == (64, None, 7, 3)
    assert cpu.train.lr == 2e-3  # what on_cpu does not name stays as in the file
    assert load_config(path, ["train.batch_size=32"], device="cpu").train.batch_size == 32
    assert load_config(path, ["train.device=cpu"], device="cuda").train.batch_size == 64  # train.device decides
    assert load_config(path, ["train.device=cuda"], device="cpu").train.batch_size == 512
    assert "on_cpu" not in cpu.to_dict()  # config.json holds the resolved values only
    shipped = load_config(ROOT / "configs/mnist.yaml", device="cpu")
    assert (shipped.train.batch_size, shipped.train.channels_last) == (64, True)


@pytest.mark.parametrize("section, match", [
    ("on_cpu: {train: {batch_sise: 64}}", r"on_cpu in .*: unknown config key train.batch_sise \(did you mean"),
    ("on_cpu: {train: {lr: -1}}", r"on_cpu in .*: train.lr must be in"),
    ("on_cpu: [1, 2]", "on_cpu in .* must hold sections like the file itself"),
])
def test_a_bad_on_cpu_section_fails_on_every_device(tmp_path, section, match):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{arch: cs180_class_unet, hidden: 8}}\ntrain: {{steps: 5}}\n{section}\n")
    for device in ("cuda", "cpu"):
        with pytest.raises(UserError, match=match) as e:
            load_config(path, device=device)
        assert "\n" not in str(e.value)


def test_quickstart_samples_enough_to_score_its_guided_digits():
    """The quick-start's last event holds >= 200 samples at gamma=5 (bench/quality.py scores them)."""
    cfg = load_config(ROOT / "ddpm/quickstart.yaml", device="cpu")
    assert cfg.sample.convention == "gamma" and 5.0 in cfg.sample.guidance and cfg.sample.per_class * 10 >= 200
