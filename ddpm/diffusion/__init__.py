"""Diffusion: the maths, no files and no command line. Builds on ``ddpm.errors`` and ``ddpm.data``.

Public surface (import from the modules):

- ``ddpm.diffusion.schedule``: ``NoiseSchedule`` (linear, cosine, quadratic; every per-step quantity in float64)
- ``ddpm.diffusion.objectives``: ``q_sample``, the eps/x0/v, rectified-flow, denoiser and noisy-classifier losses
- ``ddpm.diffusion.samplers``: DDPM, DDIM, Euler/Heun flow sampling, classifier-free and classifier guidance,
  slerp interpolation (one call signature: ``eps_model(x, t, y)``, a shape, labels, a generator)
- ``ddpm.diffusion.from_config``: a config's net → samples (``generate``, ``schedule_for``, ``effective_steps``)
- ``ddpm.diffusion.compiled``: the persistent torch.compile cache, compiled CUDA sampling
"""
