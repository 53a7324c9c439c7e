"""Diffusion: the maths, no files and no command line. Builds on ``ddpm.errors`` and ``ddpm.data``.

Public surface (import from the modules):

- ``ddpm.diffusion.schedule``: ``NoiseSchedule`` (linear, cosine, quadratic; every per-step quantity in float64)
- ``ddpm.diffusion.objectives``: ``OBJECTIVES`` (eps, x0, v, rectified flow, EDM, one-step denoiser, noisy
  classifier: one class each with ``draw``, ``loss``, ``bucket``, ``denoiser``), ``q_sample``
- ``ddpm.diffusion.samplers``: DDPM, DDIM, Euler and Heun flow sampling, DPM-Solver++(2M) for every objective
  (a ``Trajectory``; ``karras_sigmas``, ``karras_timesteps``) in one call shape
  (``sample_X(model, x, steps, labels, *, noise, callback)``), ``StepNoise``, classifier-free and classifier
  guidance, slerp
- ``ddpm.diffusion.from_config``: a config → ``objective_for``, ``sampling_for`` (a ``Sampling``), ``generate``
  (sample i a function of (seed, i)), ``schedule_for``, ``trajectory_for``; per-sampler facts: ``SAMPLERS``,
  ``DEFAULT_STEPS``, ``EVALUATIONS_PER_STEP`` / ``network_evaluations``, ``CLIPPING``
- ``ddpm.diffusion.compiled``: the persistent torch.compile cache and its worker bound, ``ieee_fp32``, compiled
  CUDA sampling
"""
