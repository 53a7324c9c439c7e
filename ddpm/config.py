"""One config object: YAML (``yaml.safe_load``) + ``key.sub=value`` overrides, validated once, frozen.

Every error is a :class:`UserError` whose one-line message names the key and the fix. The resolved
config is plain data (``to_dict``) and is written to ``RUN_DIR/config.json`` by the training job.
"""
import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ddpm.data.datasets import DATASETS
from ddpm.errors import UserError


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"              # mnist | cifar10
    root: str = "data"                  # torchvision root; MNIST lives in ROOT/MNIST/raw
    download: bool = False              # only on a node with internet (login node); see jobs.prepare_data
    hflip: bool = False                 # random horizontal flips (CIFAR-10)
    normalize: list | None = None       # [mean, std]; None scales to [-1, 1]


@dataclass(frozen=True)
class DiffusionConfig:
    objective: str = "eps"              # eps | x0 | v | rectified_flow | denoiser | classifier (ddpm.diffusion.objectives)
    schedule: str = "linear"            # linear | cosine | quadratic
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p_uncond: float = 0.1               # label dropout to the null class (classifier-free guidance)
    sigma: float = 0.5                  # noise level of the one-step denoiser objective


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128               # global batch: per-rank batch x world size
    epochs: float | None = None         # give epochs or steps, not both
    steps: int | None = None
    optimizer: str = "adam"             # adam | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: str = "constant"       # constant | exponential | multistep | cosine
    lr_gamma: float = 0.1               # exponential: factor per epoch; multistep: factor per milestone
    lr_milestones: list = field(default_factory=list)  # multistep milestones, in epochs
    warmup_steps: int = 0               # linear warm-up before every schedule
    grad_clip: float = 0.0              # max global grad norm; 0 disables
    ema_decay: float = 0.999            # 0 disables EMA
    precision: str = "fp32"             # fp32 | bf16 (autocast; CUDA only, fp32 on CPU)
    compile: bool = False               # torch.compile the net (CUDA only)
    channels_last: bool = False         # channels_last memory format (CPU and CUDA)
    device: str = "auto"                # auto | cpu | cuda
    seed: int = 0
    collective_timeout_s: int = 600     # how long a collective waits for a peer rank before the job fails


# Keys typed "epochs": epoch schedules (epoch_schedule: 5, [1, 5, 10], [1, every 5]; ddpm.train.schedules.EpochSchedule)
@dataclass(frozen=True)
class LogConfig:
    every: int = 50                     # scalars every N optimizer steps (and at every epoch's end)
    sample_every: int = 0               # sample grid every N steps; 0 = only at the end
    sample_every_epochs: "epochs" = field(default_factory=list)  # sample grids at these epochs' ends
    gif_every_epochs: "epochs" = field(default_factory=list)     # ... with a GIF of their denoising (one grid each)
    test_every_epochs: "epochs" = field(default_factory=lambda: ["every 1"])  # held-out loss: test_loss in metrics
    test_images: int = 1000             # the first N test-split images, each with fixed noise, level and label drop
    tensorboard: bool = True
    progress: str = "auto"              # auto (bar when interactive) | bar | lines | none


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500                    # also saved at the end and on a preemption signal
    every_epochs: "epochs" = field(default_factory=list)  # also saved, and kept by retention, at these epochs' ends
    best: bool = False                  # checkpoints/best names the checkpoint of the lowest test_loss (kept)
    every_minutes: float = 0.0          # also saved when this many minutes passed since the last save; 0 = off
    keep_last: int = 3
    keep_every: int = 0                 # also keep checkpoints whose step is a multiple of this


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "ddpm"               # ddpm | ddim | euler | heun (ddpm.diffusion.from_config.SAMPLERS)
    steps: int = 0                      # DDIM / flow steps; 0 = T for ddpm, 50 for ddim, 100 for flows
    guidance: list = field(default_factory=lambda: [1.0])  # scales for the sample grids
    convention: str = "gamma"           # gamma | w  (see ddpm.diffusion.samplers.to_gamma)
    per_class: int = 4
    ema: bool = True
    seed: int = 1234
    clip_x0: bool = False               # clip the predicted x0 to [-1, 1] at every ddpm/ddim step (Ho et al.)
    eta: float = 0.0                    # DDIM's stochasticity: 0 deterministic, 1 as DDPM (Song et al., eq. 16)


@dataclass(frozen=True)
class Config:
    name: str = "run"
    run_root: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: {"arch": "cs180_class_unet"})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short sha256 of the resolved config (archive attrs, metrics)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def net_kwargs(self) -> dict:
        """Constructor kwargs for ``ddpm.nets.registry.build_net(model.arch, **kwargs)``."""
        return {k: v for k, v in self.model.items() if k != "arch"}


CHOICES = {
    "data.dataset": tuple(DATASETS), "diffusion.schedule": ("linear", "cosine", "quadratic"),
    "train.optimizer": ("adam", "adamw"), "train.lr_schedule": ("constant", "exponential", "multistep", "cosine"),
    "train.precision": ("fp32", "bf16"), "train.device": ("auto", "cpu", "cuda"),
    "log.progress": ("auto", "bar", "lines", "none"), "sample.convention": ("gamma", "w"),
}
# key -> (low, high, low inclusive); None means unbounded.
RANGES = {
    "diffusion.T": (2, None, True), "diffusion.beta_start": (0, 1, False), "diffusion.beta_end": (0, 1, False),
    "diffusion.p_uncond": (0, 1, True), "diffusion.sigma": (0, None, False),
    "train.batch_size": (1, None, True), "train.epochs": (0, None, False), "train.steps": (1, None, True),
    "train.lr": (0, None, False), "train.weight_decay": (0, None, True), "train.lr_gamma": (0, None, False),
    "train.warmup_steps": (0, None, True), "train.collective_timeout_s": (10, None, True),
    "train.grad_clip": (0, None, True), "train.ema_decay": (0, 1, True), "log.every": (1, None, True),
    "log.sample_every": (0, None, True), "log.test_images": (1, None, True), "checkpoint.every": (1, None, True),
    "checkpoint.every_minutes": (0, None, True), "checkpoint.keep_last": (1, None, True),
    "checkpoint.keep_every": (0, None, True),
    "sample.steps": (0, None, True), "sample.per_class": (1, None, True), "sample.eta": (0, 1, True),
}
# List keys whose elements must be numbers: key -> fixed length (None: any length).
LIST_ITEMS = {"sample.guidance": (None, "[1.0, 5.0]"), "train.betas": (2, "[0.9, 0.999]"),
              "train.lr_milestones": (None, "[6, 8]"), "data.normalize": (2, "[0.1307, 0.3081]")}
DERIVED_NET_KEYS = ("in_channels", "image_size", "T")  # injected from data/diffusion; a config may not set them


def load_config(path, overrides=(), device: str | None = None) -> Config:
    """Read a YAML config, apply ``key.sub=value`` overrides, validate; raise UserError on any problem.

    An ``on_cpu:`` section (the file's sections, e.g. ``on_cpu: {train: {batch_size: 64}}``) is merged over the
    file, before the overrides, when the run trains on a CPU (``device``, cpu | cuda; by default ``train.device``,
    ``auto`` meaning cuda if this machine has a GPU); it is always validated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing YAML file, e.g. --config configs/mnist.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"YAML syntax error in {path}{where}: {problem}; fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of sections (data:, model:, train:, ...)")
    parsed = [parse_override(item) for item in overrides]
    on_cpu = raw.pop("on_cpu", None)
    if on_cpu is not None:
        raw = _merge_on_cpu(raw, on_cpu, path, _training_device(raw, dict(parsed), device) == "cpu")
    for key, value in parsed:
        # Overriding the run length in steps replaces a length in epochs from the file, and vice versa.
        other = {"train.steps": "epochs", "train.epochs": "steps"}.get(key)
        if other and f"train.{other}" not in dict(parsed) and isinstance(raw.get("train"), dict):
            raw["train"].pop(other, None)
        _set_path(raw, key, value)
    return from_dict(raw)


def _training_device(raw: dict, overrides: dict, device: str | None) -> str:
    """cpu or cuda: where a run of this (not yet validated) config trains."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    wanted = str(overrides.get("train.device", train.get("device", "auto")))
    if wanted != "auto":
        return "cpu" if wanted == "cpu" else "cuda"
    if device is not None:
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _merge_on_cpu(raw: dict, on_cpu, path: Path, apply: bool) -> dict:
    """``raw`` with the ``on_cpu`` section merged over it if ``apply``; validated either way."""
    if not isinstance(on_cpu, dict) or not all(isinstance(v, dict) for v in on_cpu.values()):
        raise UserError(f"on_cpu in {path} must hold sections like the file itself, e.g. on_cpu: {{train: {{batch_size: 64}}}}")
    merged = {**raw, **{name: {**(raw.get(name) or {}), **section} for name, section in on_cpu.items()}}
    length = {"steps", "epochs"} & (on_cpu.get("train") or {}).keys()
    if length:  # a run length in on_cpu replaces the file's, as an override does
        merged["train"] = {k: v for k, v in merged["train"].items() if k in length or k not in ("steps", "epochs")}
    try:  # on every device, so that a mistake in it shows on the GPU machine too
        from_dict(copy.deepcopy(merged))
    except UserError as e:
        raise UserError(f"on_cpu in {path}: {e}") from None
    return merged if apply else raw


def parse_override(item: str) -> tuple[str, object]:
    """``train.lr=2e-4`` -> ("train.lr", "2e-4" parsed as YAML). Malformed -> UserError."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or not value.strip() or any(not p.isidentifier() for p in key.split(".")):
        raise UserError(f"malformed override '{item}'; write key.sub=value, e.g. train.lr=2e-4")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise UserError(f"override '{item}' has an unparsable value; quote strings, lists as [1, 2]") from None


def _set_path(raw: dict, key: str, value) -> None:
    parts, node = key.split("."), raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key}: '{p}' is not a section")
    node[parts[-1]] = value


def _closest(name, options) -> str:
    m = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{m[0]}'?)" if m else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(key: str, value, annotation: str):
    """Check/convert one value against its annotation (as a string, e.g. 'float | None')."""
    if annotation == "epochs":
        return epoch_schedule(key, value)
    if value is None:
        if "None" in annotation:
            return None
        raise UserError(f"{key} must not be empty (null)")
    base = annotation.split("|")[0].strip()
    if base in ("bool", "str"):
        if not isinstance(value, bool if base == "bool" else str):
            raise UserError(f"{key} must be {'true or false' if base == 'bool' else 'a string'}, got {value!r}")
        return value
    if base in ("int", "float"):
        number = _number(value)
        if number is None:
            raise UserError(f"{key} must be a {'finite ' if isinstance(value, float) else ''}number, got {value!r}")
        if base == "int" and number != int(number):
            raise UserError(f"{key} must be an integer, got {value}")
        return int(number) if base == "int" else float(number)
    if base == "list":
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return _check_items(key, items) if key in LIST_ITEMS else items
    return value


def _number(v):
    """v as a finite int or float (YAML reads 1e-4 as a string: parsed), or None if it is none."""
    try:
        v = float(v) if isinstance(v, str) else v
    except ValueError:
        return None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _check_items(key: str, items: list) -> list:
    """Every element a finite number (YAML reads 1e-4 as a string), and the fixed length where there is one."""
    length, example = LIST_ITEMS[key]
    out = [_number(v) for v in items]
    if None in out:
        raise UserError(f"{key} must be a list of numbers, got {items!r} (e.g. {key}={example})")
    if length is not None and len(out) != length:
        raise UserError(f"{key} must hold exactly {length} numbers, got {len(out)}: {items!r} (e.g. {key}={example})")
    return out


def epoch_schedule(key: str, value) -> list:
    """A validated epoch schedule as a sorted list, epochs (int >= 1) first, then periods ("every N"): 5 and
    "every 5" are a period, [1, 5, 10] epochs, [1, every 5] both; null, 0 and [] none."""
    epochs, periods = set(), set()
    for item in value if isinstance(value, list) else [] if value in (None, 0) else [value]:
        m = re.fullmatch(r"(every\s+)?0*([1-9][0-9]*)(\.0*)?", str(item).strip().lower())
        if m is None or isinstance(item, bool):
            raise UserError(f"{key} must be a period (5), epochs ([1, 5, 10]) or both ([1, every 5]); got {value!r}")
        (periods if m.group(1) or not isinstance(value, list) else epochs).add(int(m.group(2)))
    return sorted(epochs) + [f"every {n}" for n in sorted(periods)]


def _section(cls, key: str, raw):
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{key} must be a section (a mapping), got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in raw.items():
        full = f"{key}.{name}"
        if name not in fields:
            raise UserError(f"unknown config key {full}{_closest(name, fields)}")
        t = fields[name].type
        value = _coerce(full, value, t.__name__ if isinstance(t, type) else str(t))
        if full in CHOICES and value not in CHOICES[full]:
            raise UserError(f"{full} must be one of {', '.join(CHOICES[full])}, got '{value}'")
        if full in RANGES and value is not None:
            lo, hi, lo_incl = RANGES[full]
            if (lo is not None and (value < lo or (value == lo and not lo_incl))) or (hi is not None and value > hi):
                span = f"{'[' if lo_incl else '('}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
                raise UserError(f"{full} must be in {span}, got {value}")
        values[name] = value
    return cls(**values)


def from_dict(raw: dict) -> Config:
    """Validate a nested dict (as read from YAML or config.json) into a frozen Config."""
    top = {f.name: f for f in dataclasses.fields(Config)}
    for name in raw:
        if name not in top:
            raise UserError(f"unknown config section or key '{name}'{_closest(name, top)}")
    sections = {name: _section(top[name].default_factory().__class__, name, raw.get(name))
                for name in ("data", "diffusion", "train", "log", "checkpoint", "sample")}
    cfg = Config(name=_coerce("name", raw.get("name", "run"), "str"),
                 run_root=_coerce("run_root", raw.get("run_root", "runs"), "str"),
                 model=_model(raw.get("model"), sections["data"], sections["diffusion"]), **sections)
    _check_combinations(cfg)
    return cfg


def _model(raw, data: DataConfig, diff: DiffusionConfig) -> dict:
    # imported lazily: torch is slow to import
    from ddpm.nets.registry import build_net, net_kwargs

    if raw is None or "arch" not in raw:
        raise UserError("model.arch is required, e.g. model.arch=cs180_class_unet")
    arch, raw = raw["arch"], {k: v for k, v in raw.items() if k != "arch"}
    accepted = net_kwargs(arch)  # UserError listing the choices for an unknown arch
    facts, out = DATASETS[data.dataset], {"arch": arch}
    derived = {"in_channels": facts["channels"], "image_size": facts["size"], "T": diff.T}
    for name, value in raw.items():
        if name in DERIVED_NET_KEYS:
            if value == derived[name]:  # a resolved config (config.json) carries them
                continue
            raise UserError(f"model.{name}={value} conflicts with the value derived from data.dataset and "
                            f"diffusion.T ({derived[name]}); remove model.{name} from the config")
        if name not in accepted:
            raise UserError(f"unknown config key model.{name} for {arch}{_closest(name, accepted)}")
        out[name] = value
    out.update({k: v for k, v in derived.items() if k in accepted})
    if "num_classes" in accepted and "num_classes" not in raw:
        out["num_classes"] = facts["classes"]
    import torch
    with torch.device("meta"):  # validates the kwargs' values without allocating weights
        build_net(arch, **{k: v for k, v in out.items() if k != "arch"})
    return out


def _check_combinations(cfg: Config) -> None:
    t, d, s = cfg.train, cfg.diffusion, cfg.sample
    if (t.epochs is None) == (t.steps is None):
        raise UserError("set exactly one of train.epochs and train.steps")
    if d.beta_start >= d.beta_end and d.schedule != "cosine":
        raise UserError(f"diffusion.beta_start ({d.beta_start}) must be below diffusion.beta_end ({d.beta_end})")
    if cfg.data.normalize is not None and (len(cfg.data.normalize) != 2 or not cfg.data.normalize[1] > 0):
        raise UserError("data.normalize must be [mean, std] with std > 0, or null for [-1, 1]")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise UserError(f"train.betas must be two numbers in [0, 1), got {t.betas}")
    if t.lr_schedule == "multistep" and not t.lr_milestones:
        raise UserError("train.lr_schedule=multistep needs train.lr_milestones (epochs), e.g. [6, 8]")
    from ddpm.diffusion.from_config import SAMPLERS  # imported lazily: torch is slow to import
    from ddpm.diffusion.objectives import OBJECTIVES

    if s.sampler not in SAMPLERS:
        raise UserError(f"sample.sampler must be one of {', '.join(SAMPLERS)}, got '{s.sampler}'")
    if d.objective not in OBJECTIVES:
        raise UserError(f"diffusion.objective must be one of {', '.join(OBJECTIVES)}, got '{d.objective}'")
    obj = OBJECTIVES[d.objective]
    conditional = bool(cfg.model.get("num_classes", 0)) and obj.kind == "generative"
    if not conditional and s.guidance != [1.0] and s.guidance:
        raise UserError(f"sample.guidance={s.guidance} needs a class-conditional model (model.num_classes > 0); "
                        "set sample.guidance=[1.0]")
    if s.sampler in ("ddpm", "ddim") and (s.steps > d.T or (s.sampler == "ddpm" and s.steps not in (0, d.T))):
        raise UserError(f"sample.steps={s.steps} exceeds diffusion.T={d.T}" if s.steps > d.T else f"sample.steps="
                        f"{s.steps}: the ddpm sampler runs all T={d.T} steps; set sample.steps=0 or sample.sampler=ddim")
    if obj.kind == "generative" and s.sampler not in obj.samplers:
        raise UserError(f"sample.sampler={s.sampler} does not fit diffusion.objective={d.objective}; "
                        f"use {' or '.join(obj.samplers)}")
    if cfg.checkpoint.best and not cfg.log.test_every_epochs:
        raise UserError("checkpoint.best=true needs the held-out loss: set log.test_every_epochs=1 (or best=false)")
    if cfg.log.gif_every_epochs and obj.kind != "generative":
        raise UserError(f"log.gif_every_epochs: a {obj.kind} run samples nothing to animate; remove it")
    if s.eta > 0 and s.sampler != "ddim":
        raise UserError(f"sample.eta={s.eta:g} is DDIM's; set sample.sampler=ddim or sample.eta=0")
    arch = cfg.model["arch"]
    if obj.arch and arch != obj.arch:
        raise UserError(f"diffusion.objective={d.objective} trains model.arch={obj.arch}, got {arch}")
    needs = [o for o in OBJECTIVES.values() if o.arch == arch]
    if needs and not obj.arch:
        raise UserError(f"model.arch={arch} needs diffusion.objective={needs[0].name}")
