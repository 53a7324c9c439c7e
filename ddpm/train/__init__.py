"""Train: the training job. Builds on everything below it (``errors``, ``config``, ``data``, ``nets``,
``diffusion``, ``run``), never on ``ddpm.evaluate``.

Public surface (import from the modules):

- ``ddpm.train.job``: ``train`` (the training job: config → run dir → lock → Trainer → closing lines)
- ``ddpm.train.loop``: ``Trainer`` (the one training loop; one optimizer step is ``train_step``), ``LossStats``
- ``ddpm.train.wrap``: the net as training calls it (DDP, torch.compile that falls back to eager on every rank)
- ``ddpm.train.schedules``: ``total_steps``, ``lr_at``, ``ema_decay_at``, ``EpochSchedule`` (which steps end
  the epochs of ``log.sample_every_epochs`` and the other epoch schedules)
- ``ddpm.train.heldout``: ``HeldOut`` (the held-out loss on the test split, with fixed draws per image)
- ``ddpm.train.sample_grids``: the sampling events of a run (archive group, TensorBoard image, PNG, GIF)
- ``ddpm.train.dist``: the process group from torchrun or SLURM (``init_distributed``, ``print0``, ``reduce_mean``)
- ``ddpm.train.preempt``: signal → flag (``PreemptionHandler``, ``should_stop``)
- ``ddpm.train.progress``: ``Progress`` (a tqdm bar in a terminal, plain lines in batch logs)
"""
