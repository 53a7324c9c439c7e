"""The training loop: the only one. Reads top to bottom: setup, resume, step, log, checkpoint, sample.

Everything that varies over a run is a pure function of (seed, step, rank): the batch
(:class:`ddpm.data.batcher.StepBatcher`), the noise, timesteps and label-drop mask (drawn for the whole
global batch from a generator seeded by (seed, step) and sliced per rank, so 1 process and N processes
see the same draws), dropout (global RNG reseeded per step and rank), the learning rate and the EMA decay
(:mod:`ddpm.train.schedules`). A resumed run therefore repeats an uninterrupted one bit for bit (on CPU;
CUDA kernels may not be deterministic).

Compilation can never take a run down: the first step of every process first runs its forward and backward
through the compiled model without syncing gradients or keeping any state (a trial); if compiling failed on
any rank, at wrapping or in that trial, every rank trains eagerly and rank 0 says so in one warning line.
``DDPM_COMPILE_BACKEND`` (for tests) names the dynamo backend and makes ``train.compile`` and
``train.precision=bf16`` apply on the CPU as on CUDA, so that the CUDA wrapping runs in a CPU test.
"""
import copy
import datetime
import gc
import os
import time
from contextlib import contextmanager

import torch
from torch.nn.parallel import DistributedDataParallel

from ddpm.config import Config
from ddpm.data.batcher import (
    DROPOUT_STREAM,
    INIT_STREAM,
    NOISE_STREAM,
    StepBatcher,
    mix_seed,
)
from ddpm.data.datasets import load_dataset
from ddpm.diffusion import objectives
from ddpm.diffusion.compiled import use_persistent_cache
from ddpm.diffusion.from_config import schedule_for
from ddpm.errors import REQUEUE_EXIT_CODE, TrainingDiverged, UserError
from ddpm.nets.loading import clean_state_dict, load_weights
from ddpm.nets.registry import build_net
from ddpm.run.atomic import writing
from ddpm.run.checkpoints import CheckpointManager
from ddpm.run.lock import describe
from ddpm.run.metrics_log import RunLogger
from ddpm.train.dist import DistInfo, any_rank, barrier, gather_from_all, print0, reduce_mean
from ddpm.train.preempt import PreemptionHandler
from ddpm.train.progress import Progress
from ddpm.train.sample_grids import write_event
from ddpm.train.schedules import ema_decay_at, lr_at, total_steps

COMPILE_BACKEND_ENV = "DDPM_COMPILE_BACKEND"


class Trainer:
    """One run: ``Trainer(cfg, run_dir, info, resume).run()`` returns 0 when done, 75 on preemption."""

    def __init__(self, cfg: Config, run_dir, info: DistInfo, images=None, labels=None):
        self.cfg, self.run_dir, self.info, self.dev = cfg, run_dir, info, info.device
        if images is None:
            images, labels = load_dataset(cfg.data.dataset, cfg.data.root, True, cfg.data.download)
        norm = tuple(cfg.data.normalize) if cfg.data.normalize else None
        self.batcher = StepBatcher(images, labels, cfg.train.batch_size, info.world_size, info.rank, cfg.train.seed,
                                   cfg.data.hflip, norm, self.dev)
        self.total = total_steps(cfg, self.batcher.steps_per_epoch)
        self.sched = schedule_for(cfg).to(self.dev, torch.float32)
        torch.manual_seed(mix_seed(cfg.train.seed, INIT_STREAM))  # same initial weights on every rank and run
        self.net = build_net(cfg.model["arch"], **cfg.net_kwargs()).to(self.dev)
        self.num_classes = getattr(self.net, "num_classes", 0)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False) if cfg.train.ema_decay > 0 else None
        cuda = self.dev.type == "cuda"
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(self.net.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                           weight_decay=cfg.train.weight_decay, fused=cuda or None)
        self.ckpt = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
        self.step = 0
        self.resumed = False
        self.grids = []  # sample-grid PNGs written by this process, oldest first
        self.lock = None  # the run dir's RunLock (rank 0), set by the job
        self.gen = torch.Generator(device=self.dev)
        self.backend = os.environ.get(COMPILE_BACKEND_ENV)  # tests: compile and bf16 on the CPU too
        fast = cuda or self.backend is not None
        self.compile = cfg.train.compile and fast
        self.autocast = torch.autocast(self.dev.type, torch.bfloat16, enabled=fast and cfg.train.precision == "bf16")

    # ----- state -------------------------------------------------------------------------------------
    def load_checkpoint(self) -> None:
        """Every rank loads the newest verified checkpoint itself (to CPU first).

        A run dir without a checkpoint restarts at step 0 but still counts as resumed, so the logs of
        the steps done before the crash are trimmed instead of duplicated.
        """
        self.resumed = True
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

    def state(self) -> dict:
        return {"model": clean_state_dict(self.net.state_dict()),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.opt.state_dict(), "step": self.step, "config": self.cfg.to_dict()}

    def save(self) -> None:
        if self.info.is_main:
            self.check_lock()
            with writing(f"checkpoint step {self.step}", self.ckpt.directory):
                self.ckpt.save(self.step, self.state())
        barrier()

    def check_lock(self) -> None:
        """Stop before writing anything if another job took this run dir's lock over (see ddpm.run.lock)."""
        if self.lock is not None and not self.lock.owned():
            holder, age = self.lock.read()
            who = describe(holder, age) if holder else "nobody (the lock file was removed)"
            raise UserError(f"another job took over the lock of {self.run_dir} ({who}); this one stops at step "
                            f"{self.step} without writing; run one job per run dir")

    # ----- one optimizer step ------------------------------------------------------------------------
    def draws(self, step: int, shape):
        """Noise, timesteps and label-drop mask for this rank: drawn for the global batch, then sliced."""
        B, b, r = self.cfg.train.batch_size, shape[0], self.info.rank
        g = self.gen.manual_seed(mix_seed(self.cfg.train.seed, NOISE_STREAM, step))
        noise = torch.randn((B, *shape[1:]), generator=g, device=self.dev)[r * b:(r + 1) * b]
        if self.cfg.diffusion.objective == "rectified_flow":
            t = torch.rand(B, generator=g, device=self.dev)
        else:
            t = torch.randint(0, self.cfg.diffusion.T, (B,), generator=g, device=self.dev)
        drop = torch.rand(B, generator=g, device=self.dev) < self.cfg.diffusion.p_uncond
        return noise, t[r * b:(r + 1) * b], drop[r * b:(r + 1) * b]

    def loss(self, model, x, y, noise, t, drop) -> torch.Tensor:
        d = self.cfg.diffusion
        yy = objectives.drop_labels(y, drop, self.num_classes) if self.num_classes else None
        if d.objective in objectives.PREDICTIONS:
            return objectives.diffusion_loss(model, self.sched, x, t, noise, yy, d.objective)
        if d.objective == "rectified_flow":
            return objectives.rectified_flow_loss(model, x, t, noise, yy)
        if d.objective == "denoiser":
            return objectives.denoiser_loss(model, x, noise, d.sigma)
        return objectives.classifier_loss(model, self.sched, x, t, noise, y)

    def forward_loss(self, model, step: int):
        """Per-sample losses (B,) of this rank's part of step ``step``'s batch, and its timesteps."""
        torch.manual_seed(mix_seed(self.cfg.train.seed, DROPOUT_STREAM, step, self.info.rank))
        x, y = self.batcher.batch(step)
        noise, t, drop = self.draws(step, x.shape)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            return self.loss(model, x, y, noise, t, drop), t

    # ----- wrapping: memory format, DDP, compilation ---------------------------------------------------
    def wrap(self):
        """(eager, compiled, error): the net as training calls it, its torch.compile wrapper (None where
        compilation does not apply or failed), and the one-line error of a failed wrapping."""
        if self.cfg.train.channels_last:
            self.net.to(memory_format=torch.channels_last)
            if self.ema is not None:  # same strides as the net, or the foreach EMA update falls back to a loop
                self.ema.to(memory_format=torch.channels_last)
        if self.dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # shapes are fixed for the whole run
        model = self.ddp() if self.info.world_size > 1 else self.net
        if not self.compile:
            return model, None, None
        print0(f"torch.compile cache: {use_persistent_cache(log=print0)} (set TORCHINDUCTOR_CACHE_DIR to change)")
        try:
            return model, torch.compile(model, backend=self.backend or "inductor"), None
        except Exception as e:  # an unknown backend, a broken toolchain: never the end of the run
            return model, None, _one_line(e)

    def ddp(self) -> DistributedDataParallel:
        # Every parameter gets a gradient every step: a static graph lets DDP skip the unused-parameter
        # search, and bucket views avoid a gradient copy. BatchNorm running statistics (CS180 nets) are
        # not broadcast before every forward: training uses batch statistics, and only rank 0's
        # running statistics are saved and sampled with, so the broadcast would be a wasted collective.
        return DistributedDataParallel(self.net, device_ids=[self.dev.index] if self.dev.type == "cuda" else None,
                                       gradient_as_bucket_view=True, static_graph=True, broadcast_buffers=False)

    def settle_compilation(self, eager, compiled, error):
        """(model, first): the model to train with, and the losses of this process's first step if the
        compiled model computed them.

        Compilation happens in the first forward (the backward is compiled there too, so that its errors
        show before any gradient all-reduce). Ranks exchange their errors before anyone starts a backward:
        a rank waiting in an all-reduce for a failed peer would hang until the collective timeout. If any
        rank failed, all drop the compiled model and its forward, restore the BatchNorm statistics that
        forward updated, and train eagerly with a fresh DDP wrapper (the old one waits for a backward).
        """
        buffers = [b.detach().clone() for b in self.net.buffers()]
        first = None
        if error is None:
            try:
                with _backward_compiled_in_forward():
                    first = self.forward_loss(compiled, self.step)
            except Exception as e:  # any compiler or toolchain error
                error = _one_line(e)  # text only: the traceback would keep the old DDP wrapper alive
        failed = [(rank, e) for rank, e in enumerate(gather_from_all(error)) if e]
        if not failed:
            return compiled, first
        rank, what = failed[0]
        print0(f"warning: torch.compile failed on rank {rank} ({what}); all {self.info.world_size} rank(s) train "
               "without it (slower); set train.compile=false to skip compiling")
        del first, compiled
        torch._dynamo.reset()
        with torch.no_grad():
            for b, saved in zip(self.net.buffers(), buffers):
                b.copy_(saved)
        if isinstance(eager, DistributedDataParallel):
            del eager
            gc.collect()  # the old wrapper's gradient hooks must be gone before the new one's first backward
            eager = self.ddp()
        return eager, None

    # ----- the run -----------------------------------------------------------------------------------
    def run(self) -> int:
        cfg, info = self.cfg, self.info
        if self.compile and self.step < self.total:
            model, first = self.settle_compilation(*self.wrap())  # the call owns the wrappers (see there)
        else:
            model, first = self.wrap()[0], None
        # Initialize logging and the running statistics.
        with writing("metrics.jsonl", self.run_dir / "metrics.jsonl"):
            logger = RunLogger(self.run_dir, enabled=info.is_main, resume_step=self.step if self.resumed else None,
                               tensorboard=cfg.log.tensorboard, log=print0)
        print0(f"{'resuming at step ' + str(self.step) if self.resumed else 'starting'}: {self.total} steps, "
               f"global batch {cfg.train.batch_size} on {info.world_size} x {self.dev}, run dir {self.run_dir}")
        progress = Progress(self.total, self.step, cfg.log.progress, info.is_main)
        T, check_every = cfg.diffusion.T, (1 if info.world_size == 1 else 10)
        stats = torch.zeros(10, device=self.dev, dtype=torch.float64)  # loss sum, n, 4 bucket sums, 4 counts
        bad = torch.zeros((), device=self.dev, dtype=torch.bool)
        grad_norm = torch.zeros((), device=self.dev)
        t_last, step_last = time.perf_counter(), self.step
        t_start, step_start = t_last, self.step
        saved_at = time.monotonic()
        with PreemptionHandler() as preempt:
            while self.step < self.total:
                # One optimizer step.
                step = self.step
                per_sample, t = first if first is not None else self.forward_loss(model, step)
                first = None
                loss = per_sample.mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                log_now = (step + 1) % cfg.log.every == 0 or step + 1 == self.total
                if cfg.train.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.train.grad_clip)
                elif log_now:
                    grad_norm = torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(p.grad) for p in self.net.parameters() if p.grad is not None]))
                lr = lr_at(cfg, step, self.batcher.steps_per_epoch, self.total)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                self.opt.step()
                self.update_ema(step)
                # Accumulate loss statistics on the device (no host sync until the next log step).
                with torch.no_grad():
                    ls = per_sample.detach().double()
                    bad |= ~torch.isfinite(ls).all()
                    q = (t * 4).long().clamp(max=3) if t.is_floating_point() else (t * 4 // T).clamp(max=3)
                    stats[0] += ls.sum()
                    stats[1] += ls.numel()
                    stats[2:6].index_add_(0, q, ls)
                    stats[6:10].index_add_(0, q, torch.ones_like(ls))
                self.step += 1
                # Ranks agree on a preemption signal and on a time-based checkpoint (any rank's clock).
                # A signal during the last step needs no requeue: the run finishes and saves anyway.
                stop = due = False
                if self.step % check_every == 0 and self.step < self.total:
                    minutes = cfg.checkpoint.every_minutes
                    stop, due = any_rank([preempt.requested,
                                          minutes > 0 and time.monotonic() - saved_at >= 60 * minutes], self.dev)
                # Log.
                if log_now or stop:
                    self.check_finite(bad)
                    now = time.perf_counter()
                    ips = (self.step - step_last) * cfg.train.batch_size / max(now - t_last, 1e-9)
                    scalars = self.reduce_stats(stats, lr, grad_norm, ips)
                    self.check_lock()
                    with writing("metrics.jsonl / TensorBoard", self.run_dir):
                        logger.log_scalars(self.step, scalars, epoch=self.batcher.epoch_of(self.step))
                    progress.update(self.step, scalars["loss"], ips)
                    stats.zero_()
                    t_last, step_last = now, self.step
                # Save state: on a preemption signal (then exit), every checkpoint.every steps or
                # checkpoint.every_minutes, at the end.
                if stop:
                    self.save()
                    progress.close()
                    print0(f"preemption signal ({preempt.signal_name or 'peer rank'}) at step {self.step}: "
                           f"checkpoint saved, exiting with {REQUEUE_EXIT_CODE} so the job is requeued")
                    with writing("metrics.jsonl / TensorBoard", self.run_dir):
                        logger.close()
                    return REQUEUE_EXIT_CODE
                if self.step % cfg.checkpoint.every == 0 or self.step == self.total or due:
                    self.check_finite(bad)
                    self.save()
                    saved_at = time.monotonic()
                # Sample.
                if cfg.log.sample_every and self.step % cfg.log.sample_every == 0 and self.step != self.total:
                    self.write_samples(logger)
        progress.close()
        self.write_samples(logger)
        with writing("metrics.jsonl / TensorBoard", self.run_dir):
            logger.close()
        wall = time.perf_counter() - t_start
        ips = (self.total - step_start) * cfg.train.batch_size / max(wall, 1e-9)
        print0(f"done: {self.total} steps, run dir {self.run_dir} ({self.total - step_start} steps in "
               f"{datetime.timedelta(seconds=round(wall))}: {ips:,.0f} img/s on average, compilation, checkpoints "
               "and samples included)")
        return 0

    def update_ema(self, step: int) -> None:
        if self.ema is None:
            return
        decay = ema_decay_at(self.cfg.train.ema_decay, step)
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - decay)
            buffers = list(self.ema.buffers())
            if buffers:
                torch._foreach_copy_(buffers, list(self.net.buffers()))

    def check_finite(self, bad: torch.Tensor) -> None:
        if bool(reduce_mean(bad.double(), self.dev) > 0):
            steps = self.ckpt.steps()
            last = f"the last good checkpoint (step {steps[-1]}) is intact" if steps else "no checkpoint was written"
            raise TrainingDiverged(f"the loss became NaN/Inf at or before step {self.step}; {last}; "
                                   "lower train.lr or set train.grad_clip")

    def reduce_stats(self, stats, lr, grad_norm, ips) -> dict:
        s = reduce_mean(stats, self.dev).tolist()
        out = {"loss": s[0] / max(s[1], 1), "lr": lr, "grad_norm": float(grad_norm), "images_per_s": ips}
        if self.cfg.diffusion.objective != "denoiser":
            out.update({f"loss/q{i}": s[2 + i] / s[6 + i] for i in range(4) if s[6 + i] > 0})
        if self.dev.type == "cuda":
            out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.dev) / 2 ** 30
        return out

    # ----- sample grids (rank 0) ---------------------------------------------------------------------
    def write_samples(self, logger: RunLogger) -> None:
        cfg = self.cfg
        if self.info.is_main and cfg.diffusion.objective != "classifier":
            net = self.ema if (cfg.sample.ema and self.ema is not None) else self.net
            was_training = net.training
            clean = self.batcher.batch(0) if cfg.diffusion.objective == "denoiser" else None
            self.check_lock()
            with writing(f"the samples of step {self.step}", self.run_dir / "samples.h5"):
                self.grids += write_event(cfg, net.eval(), step=self.step, run_dir=self.run_dir, device=self.dev,
                                          logger=logger, ema=net is self.ema, clean_batch=clean, log=print0)
            net.train(was_training)
        barrier()


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an error and of its root cause (dynamo wraps a backend's
    error into BackendCompilerFailed), at most 300 characters."""
    def line(e):
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"

    root = error
    while root.__cause__ is not None or getattr(root, "inner_exception", None) is not None:
        root = root.__cause__ or root.inner_exception
    return (line(error) if root is error else f"{type(error).__name__} <- {line(root)}")[:300]


@contextmanager
def _backward_compiled_in_forward():
    """AOTAutograd compiles the backward graph lazily, in the first backward; this makes it compile in
    the forward, so that a failure there surfaces before any rank enters a gradient all-reduce.
    (torch versions without the switch compile it lazily.)"""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        yield
        return
    with functorch_config.patch(force_non_lazy_backward_lowering=True):
        yield
