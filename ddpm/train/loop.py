"""The training loop: the only one. ``Trainer.run`` reads top to bottom (wrap, log, step, agree, save,
sample); one optimizer step is :meth:`Trainer.train_step`.

Everything that varies over a run is a pure function of (seed, step, rank): the batch
(:class:`ddpm.data.batcher.StepBatcher`), the noise, noise levels and label-drop mask (drawn for the whole
global batch from a generator seeded by (seed, step) and sliced per rank, so 1 process and N processes
see the same draws), dropout (global RNG reseeded per step and rank), the learning rate and the EMA decay
(:mod:`ddpm.train.schedules`). A resumed run therefore repeats an uninterrupted one bit for bit (on CPU;
CUDA kernels may not be deterministic). What the objective does with the draws is the objective's
(:mod:`ddpm.diffusion.objectives`); how the net is wrapped and compiled is :mod:`ddpm.train.wrap`'s.

Epoch e ends after step ``e * steps_per_epoch`` (global batches, so for any world size). Every epoch's end
logs a row with the epoch's mean training loss (``epoch_loss``) and, at the ``log.test_every_epochs``
epochs, the held-out loss (``test_loss``, :mod:`ddpm.train.heldout`); with ``checkpoint.best`` a lower
held-out loss saves a checkpoint that ``checkpoints/best`` names. A checkpoint carries the running sums of
its epoch's training loss and the best so far, so a resumed run repeats these rows and that choice too.
"""
import copy
import datetime
import time

import torch

from ddpm.config import Config
from ddpm.data.batcher import DROPOUT_STREAM, INIT_STREAM, NOISE_STREAM, StepBatcher, mix_seed
from ddpm.data.datasets import DATASETS, load_dataset
from ddpm.diffusion.from_config import objective_for
from ddpm.errors import REQUEUE_EXIT_CODE, TrainingDiverged, UserError
from ddpm.nets.loading import clean_state_dict, load_weights
from ddpm.nets.registry import build_net
from ddpm.run.atomic import writing
from ddpm.run.checkpoints import CheckpointManager
from ddpm.run.lock import describe
from ddpm.run.metrics_log import RunLogger
from ddpm.train.dist import DistInfo, any_rank, barrier, print0, reduce_mean
from ddpm.train.heldout import HeldOut
from ddpm.train.preempt import PreemptionHandler
from ddpm.train.progress import Progress
from ddpm.train.sample_grids import write_event
from ddpm.train.schedules import EpochSchedule, ema_decay_at, lr_at, total_steps
from ddpm.train.wrap import compile_backend, settle, wrap


class LossStats:
    """The losses between two log steps, kept on the device (no host sync until :meth:`reduce`): their
    mean, their mean by noise-level quartile (``quartiles``), and whether any was not finite."""

    def __init__(self, device, quartiles: bool):
        self.device, self.quartiles = device, quartiles
        self.sum = torch.zeros((), device=device, dtype=torch.float64)
        self.count = torch.zeros((), device=device, dtype=torch.float64)
        self.q_sum = torch.zeros(4, device=device, dtype=torch.float64)
        self.q_count = torch.zeros(4, device=device, dtype=torch.float64)
        self.bad = torch.zeros((), device=device, dtype=torch.bool)

    @torch.no_grad()
    def add(self, per_sample: torch.Tensor, bucket: torch.Tensor | None) -> None:
        """per_sample: (B,) losses; bucket: their quartiles, LongTensor (B,) in [0, 4), if ``quartiles``."""
        ls = per_sample.detach().double()
        self.bad |= ~torch.isfinite(ls).all()
        self.sum += ls.sum()
        self.count += ls.numel()
        if self.quartiles:
            self.q_sum.index_add_(0, bucket, ls)
            self.q_count.index_add_(0, bucket, torch.ones_like(ls))

    def finite(self) -> bool:
        """False on every rank if any rank saw a NaN/Inf loss since the run started (collective)."""
        return not bool(reduce_mean(self.bad.double(), self.device) > 0)

    def totals(self, world_size: int) -> list[float]:
        """[sum, count] of the losses so far over every rank (collective), for a checkpoint."""
        return (reduce_mean(torch.stack([self.sum, self.count]), self.device) * world_size).tolist()

    def restore(self, totals, here: bool) -> None:
        """Start from a checkpoint's :meth:`totals` (kept on one rank, ``here``: the mean over ranks is right)."""
        self.sum.fill_(totals[0] if here else 0.0)
        self.count.fill_(totals[1] if here else 0.0)

    def reduce(self) -> dict:
        """{"loss", "loss/q0".."loss/q3"} averaged over this interval and every rank; then starts over."""
        packed = reduce_mean(torch.stack([self.sum, self.count, *self.q_sum, *self.q_count]), self.device).tolist()
        out = {"loss": packed[0] / max(packed[1], 1)}
        if self.quartiles:
            out.update({f"loss/q{i}": packed[2 + i] / packed[6 + i] for i in range(4) if packed[6 + i] > 0})
        for t in (self.sum, self.count, self.q_sum, self.q_count):
            t.zero_()
        return out


class Trainer:
    """One run: ``Trainer(cfg, run_dir, info, lock=lock, resume=True).run()`` returns 0 when done, 75 on
    preemption. ``lock``: the run dir's :class:`ddpm.run.lock.RunLock` (rank 0; None elsewhere); ``resume``:
    load the newest verified checkpoint (a run dir without one restarts at step 0 but still counts as
    resumed, so the logs of the steps done before the crash are trimmed instead of duplicated).
    ``images``/``labels``: the training set, if not the config's."""

    def __init__(self, cfg: Config, run_dir, info: DistInfo, *, lock=None, resume: bool = False, images=None,
                 labels=None):
        self.cfg, self.run_dir, self.info, self.dev, self.lock = cfg, run_dir, info, info.device, lock
        if images is None:
            images, labels = load_dataset(cfg.data.dataset, cfg.data.root, True, cfg.data.download)
        norm = tuple(cfg.data.normalize) if cfg.data.normalize else None
        self.batcher = StepBatcher(images, labels, cfg.train.batch_size, info.world_size, info.rank, cfg.train.seed,
                                   cfg.data.hflip, norm, self.dev)
        self.spe = self.batcher.steps_per_epoch
        self.total = total_steps(cfg, self.spe)
        self.objective = objective_for(cfg)
        self.sample_epochs, self.gif_epochs, self.test_epochs, self.ckpt_epochs = (
            EpochSchedule(e, self.spe) for e in (cfg.log.sample_every_epochs, cfg.log.gif_every_epochs,
                                                 cfg.log.test_every_epochs, cfg.checkpoint.every_epochs))
        # The test split: for the held-out loss if an epoch of it ends in this run, for a denoiser's grids.
        tested = bool(self.test_epochs.steps(self.total))
        self.heldout = HeldOut(cfg, self.objective, info.rank, info.world_size, self.dev) \
            if tested or self.objective.kind == "denoiser" else None
        self.test_epochs = self.test_epochs if tested else EpochSchedule([], self.spe)
        torch.manual_seed(mix_seed(cfg.train.seed, INIT_STREAM))  # same initial weights on every rank and run
        self.net = build_net(cfg.model["arch"], **cfg.net_kwargs()).to(self.dev)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False) if cfg.train.ema_decay > 0 else None
        cuda = self.dev.type == "cuda"
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(self.net.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                           weight_decay=cfg.train.weight_decay, fused=cuda or None)
        self.ckpt = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every,
                                      keep=self.ckpt_epochs.due)
        self.gen = torch.Generator(device=self.dev)
        fast = cuda or compile_backend() is not None  # where compile and bf16 apply
        self.compile = cfg.train.compile and fast
        self.autocast = torch.autocast(self.dev.type, torch.bfloat16, enabled=fast and cfg.train.precision == "bf16")
        self.stats = LossStats(self.dev, self.objective.quartiles)
        self.epoch_stats = LossStats(self.dev, False)  # this epoch's training losses so far
        self.best = None  # (step, test_loss) of the checkpoint checkpoints/best names, with checkpoint.best
        self.grad_norm = torch.zeros((), device=self.dev)
        self.grids = []  # sample-grid PNGs written by this process, oldest first
        self.step, self.resumed = 0, resume
        if resume:
            self.load_checkpoint()

    # ----- state -------------------------------------------------------------------------------------
    def load_checkpoint(self) -> None:
        """Every rank loads the newest verified checkpoint itself (to CPU first)."""
        loaded = self.ckpt.load_latest()
        if loaded is None:
            return
        step, state = loaded
        what, fix = f"checkpoint step {step} in {self.ckpt.directory}", "use a new --run-dir"
        load_weights(self.net, state.get("model"), what, fix)
        if self.ema is not None and state.get("ema") is not None:
            load_weights(self.ema, state["ema"], what, fix)
        self.opt.load_state_dict(state["optimizer"])
        self.step = step
        self.epoch_stats.restore(state.get("epoch_loss") or [0.0, 0.0], self.info.is_main)
        best = state.get("best")
        self.best = (best["step"], best["test_loss"]) if best else None

    def state(self, epoch_loss=(0.0, 0.0)) -> dict:
        """What a checkpoint holds; ``epoch_loss``: :meth:`LossStats.totals` of this epoch's training losses."""
        return {"model": clean_state_dict(self.net.state_dict()),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.opt.state_dict(), "step": self.step, "config": self.cfg.to_dict(),
                "epoch_loss": list(epoch_loss),
                "best": {"step": self.best[0], "test_loss": self.best[1]} if self.best else None}

    def save(self) -> None:
        self.check_finite()
        epoch_loss = self.epoch_stats.totals(self.info.world_size)
        if self.info.is_main:
            self.check_lock()
            with writing(f"checkpoint step {self.step}", self.ckpt.directory):
                self.ckpt.save(self.step, self.state(epoch_loss), best=bool(self.best) and self.best[0] == self.step)
        barrier()

    def point_best(self) -> None:
        """Rank 0, on resume: ``checkpoints/best`` names the best checkpoint this state knows (a crash between
        a save and its pointer, or a fallback past a newer best, leaves it naming another)."""
        if not (self.info.is_main and self.cfg.checkpoint.best):
            return
        want = self.best[0] if self.best and self.best[0] in self.ckpt.steps() else None
        if self.ckpt.best_step() != want:
            self.check_lock()
            with writing("checkpoints/best", self.ckpt.directory):
                self.ckpt.set_best(want)

    def check_finite(self) -> None:
        """TrainingDiverged on every rank if any rank's loss was NaN/Inf (collective): never save such weights."""
        if not self.stats.finite():
            steps = self.ckpt.steps()
            last = f"the last good checkpoint (step {steps[-1]}) is intact" if steps else "no checkpoint was written"
            raise TrainingDiverged(f"the loss became NaN/Inf at or before step {self.step}; {last}; "
                                   "lower train.lr or set train.grad_clip")

    def check_lock(self) -> None:
        """Stop before writing anything if another job took this run dir's lock over (see ddpm.run.lock)."""
        if self.lock is not None and not self.lock.owned():
            holder, age = self.lock.read()
            who = describe(holder, age) if holder else "nobody (the lock file was removed)"
            raise UserError(f"another job took over the lock of {self.run_dir} ({who}); this one stops at step "
                            f"{self.step} without writing; run one job per run dir")

    # ----- one optimizer step ------------------------------------------------------------------------
    def forward_loss(self, model, step: int):
        """(per-sample losses (B,), noise levels (B,)) of this rank's part of step ``step``'s batch.

        The noise, noise levels and label-drop mask are drawn for the global batch, then sliced."""
        cfg, r = self.cfg, self.info.rank
        torch.manual_seed(mix_seed(cfg.train.seed, DROPOUT_STREAM, step, r))
        x, y = self.batcher.batch(step)
        B, b = cfg.train.batch_size, x.shape[0]
        g = self.gen.manual_seed(mix_seed(cfg.train.seed, NOISE_STREAM, step))
        noise = torch.randn((B, *x.shape[1:]), generator=g, device=self.dev)[r * b:(r + 1) * b]
        t = self.objective.draw(g, B, self.dev)[r * b:(r + 1) * b]
        drop = (torch.rand(B, generator=g, device=self.dev) < cfg.diffusion.p_uncond)[r * b:(r + 1) * b]
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            return self.objective.loss(model, x, y, noise, t, drop), t

    def train_step(self, model, step: int, first=None) -> float:
        """One optimizer step on step ``step``'s batch (``first``: its forward_loss, if already done);
        returns the learning rate it used."""
        per_sample, t = first if first is not None else self.forward_loss(model, step)
        self.opt.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        params = self.net.parameters
        if self.cfg.train.grad_clip > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(params(), self.cfg.train.grad_clip)
        elif self.log_due(step + 1):
            self.grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params() if p.grad is not None]))
        lr = lr_at(self.cfg, step, self.batcher.steps_per_epoch, self.total)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.update_ema(step)
        self.stats.add(per_sample, self.objective.bucket(t) if self.objective.quartiles else None)
        self.epoch_stats.add(per_sample, None)
        return lr

    def update_ema(self, step: int) -> None:
        if self.ema is None:
            return
        decay = ema_decay_at(self.cfg.train.ema_decay, step)
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - decay)
            buffers = list(self.ema.buffers())
            if buffers:
                torch._foreach_copy_(buffers, list(self.net.buffers()))

    def log_due(self, step: int) -> bool:
        return step % self.cfg.log.every == 0 or step == self.total or step % self.spe == 0

    def save_due(self, step: int) -> bool:
        """checkpoint.every steps, checkpoint.every_epochs, a new best, the end (the time-based one aside)."""
        return (step % self.cfg.checkpoint.every == 0 or step == self.total or self.ckpt_epochs.due(step)
                or (self.best is not None and self.best[0] == step))

    def sample_due(self, step: int) -> bool:
        """log.sample_every steps, log.sample_every_epochs / gif_every_epochs, not the end (which always samples)."""
        every = self.cfg.log.sample_every
        return step != self.total and ((every and step % every == 0) or self.sample_epochs.due(step)
                                       or self.gif_epochs.due(step))

    def sampling_net(self):
        """The weights samples (and the held-out loss) use: the EMA's with sample.ema, else the trained ones."""
        return self.ema if (self.cfg.sample.ema and self.ema is not None) else self.net

    # ----- the run -----------------------------------------------------------------------------------
    def run(self) -> int:
        cfg, info = self.cfg, self.info
        wrapped = wrap(self.net, self.ema, info, channels_last=cfg.train.channels_last, compile=self.compile)
        if self.compile and self.step < self.total:
            model, first = settle(wrapped, lambda compiled: self.forward_loss(compiled, self.step), self.net, info)
        else:
            model, first = wrapped[0], None
        with writing("metrics.jsonl", self.run_dir / "metrics.jsonl"):
            logger = RunLogger(self.run_dir, enabled=info.is_main, resume_step=self.step if self.resumed else None,
                               tensorboard=cfg.log.tensorboard, log=print0)
        progress = Progress(self.total, self.step, cfg.log.progress, info.is_main)
        print0(f"{'resuming at step ' + str(self.step) if self.resumed else 'starting'}: {self.total} steps "
               f"({self.total / self.spe:.4g} epochs of {self.spe}), global batch {cfg.train.batch_size} on "
               f"{info.world_size} x {self.dev}, run dir {self.run_dir}")
        self.announce_epochs()
        if self.resumed:
            self.point_best()
        check_every = 1 if info.world_size == 1 else 10  # ranks agree on signals and clocks this often
        t_start, step_start = time.perf_counter(), self.step
        t_last, step_last, saved_at = t_start, self.step, time.monotonic()
        try:
            with PreemptionHandler() as preempt:
                while self.step < self.total:
                    lr = self.train_step(model, self.step, first)
                    first = None
                    self.step += 1
                    # Agree on a preemption signal and a time-based checkpoint (any rank's clock). A signal
                    # during the last step needs no requeue: the run finishes and saves anyway.
                    stop = due = False
                    if self.step % check_every == 0 and self.step < self.total:
                        minutes = cfg.checkpoint.every_minutes
                        stop, due = any_rank([preempt.requested,
                                              minutes > 0 and time.monotonic() - saved_at >= 60 * minutes], self.dev)
                    # Log.
                    if self.log_due(self.step) or stop:
                        now = time.perf_counter()
                        ips = (self.step - step_last) * cfg.train.batch_size / max(now - t_last, 1e-9)
                        self.log(logger, progress, lr, ips)
                        t_last, step_last = now, self.step
                    # Save state: on a preemption signal (then exit), every checkpoint.every steps or
                    # checkpoint.every_minutes, at the end.
                    if stop:
                        self.save()
                        progress.close()
                        print0(f"preemption signal ({preempt.signal_name or 'peer rank'}) at step {self.step}: "
                               f"checkpoint saved, exiting with {REQUEUE_EXIT_CODE} so the job is requeued")
                        return REQUEUE_EXIT_CODE
                    if self.save_due(self.step) or due:
                        self.save()
                        saved_at = time.monotonic()
                    # Sample.
                    if self.sample_due(self.step):
                        self.write_samples(logger)
            progress.close()
            self.write_samples(logger)
        finally:
            progress.close()
            with writing("metrics.jsonl / TensorBoard", self.run_dir):
                logger.close()
        wall = time.perf_counter() - t_start
        ips = (self.total - step_start) * cfg.train.batch_size / max(wall, 1e-9)
        print0(f"done: {self.total} steps, run dir {self.run_dir} ({self.total - step_start} steps in "
               f"{datetime.timedelta(seconds=round(wall))}: {ips:,.0f} img/s on average, compilation, checkpoints "
               "and samples included)")
        return 0

    def log(self, logger: RunLogger, progress: Progress, lr: float, ips: float) -> None:
        """Reduce the statistics over ranks and write them (rank 0): metrics.jsonl, TensorBoard, progress.
        At an epoch's end also its mean training loss and, if due, the held-out loss (collective)."""
        self.check_finite()
        scalars = {**self.stats.reduce(), "lr": lr, "grad_norm": float(self.grad_norm), "images_per_s": ips}
        if self.dev.type == "cuda":
            scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.dev) / 2 ** 30
        epoch = self.step // self.spe if self.step % self.spe == 0 else None
        if epoch is not None:
            scalars["epoch_loss"] = self.epoch_stats.reduce()["loss"]
            if self.test_epochs.due(self.step):
                scalars.update(self.heldout.measure(self.sampling_net(), self.autocast, self.cfg.train.channels_last))
                if self.cfg.checkpoint.best and (self.best is None or scalars["test_loss"] < self.best[1]):
                    self.best = (self.step, scalars["test_loss"])
        self.check_lock()
        with writing("metrics.jsonl / TensorBoard", self.run_dir):
            logger.log_scalars(self.step, scalars, epoch=self.batcher.epoch_of(self.step))
        progress.update(self.step, scalars["loss"], ips)
        if epoch is not None:
            test = f" | test loss {scalars['test_loss']:.4f}" if "test_loss" in scalars else ""
            best = " (best so far: checkpoints/best)" if self.best and self.best[0] == self.step else ""
            progress.note(f"epoch {epoch}: train loss {scalars['epoch_loss']:.4f}{test}{best}")

    def announce_epochs(self) -> None:
        """One line per epoch schedule the run has (which steps), and a warning for listed epochs it never ends."""
        samples = self.objective.kind != "classifier"
        for what, sched in (("sample grids", self.sample_epochs if samples else EpochSchedule([], self.spe)),
                            ("GIFs", self.gif_epochs), ("held-out loss", self.test_epochs),
                            ("checkpoints", self.ckpt_epochs)):
            steps = sched.steps(self.total)
            if steps:
                shown = ", ".join(str(s // self.spe) for s in steps[:8]) + (", ..." if len(steps) > 8 else "")
                extra = f" of {self.heldout.count} test images" if sched is self.test_epochs else ""
                print0(f"{what}{extra} at the end of epoch {shown} (step = epoch x {self.spe})")
            if sched.beyond(self.total):
                late = ", ".join(map(str, sched.beyond(self.total)))
                print0(f"warning: {what}: epoch(s) {late} come after the run's end (step {self.total} = epoch "
                       f"{self.total / self.spe:.4g}); raise train.epochs to reach them")

    # ----- sample grids (rank 0) ---------------------------------------------------------------------
    def write_samples(self, logger: RunLogger) -> None:
        cfg = self.cfg
        if self.info.is_main and self.objective.kind != "classifier":
            net = self.sampling_net()
            was_training = net.training
            n = cfg.sample.per_class * DATASETS[cfg.data.dataset]["classes"]
            clean = self.heldout.clean(n) if self.objective.kind == "denoiser" else None  # test images, as CS180
            epoch = self.step // self.spe if self.step % self.spe == 0 else None
            self.check_lock()
            with writing(f"the samples of step {self.step}", self.run_dir / "samples.h5"):
                self.grids += write_event(cfg, self.objective, net.eval(), step=self.step, run_dir=self.run_dir,
                                          device=self.dev, logger=logger, ema=net is self.ema, clean_batch=clean,
                                          epoch=epoch, gif=self.gif_epochs.due(self.step), log=print0)
            net.train(was_training)
        barrier()
