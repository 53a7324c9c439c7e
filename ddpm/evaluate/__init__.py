"""Evaluate: the post-hoc evaluation job, plan → parts (one table) → figures, metrics, report. Builds on
everything below it (``errors``, ``config``, ``data``, ``nets``, ``diffusion``, ``run``), never on ``ddpm.train``.

Public surface (import from the modules):

- ``ddpm.evaluate.plan``: ``Request``, ``make_plan`` (validates everything, writes nothing), ``Plan``
- ``ddpm.evaluate.parts``: ``PARTS`` / ``SECTIONS`` (the one table), ``run`` (executes a plan)
- ``ddpm.evaluate.sampled``, ``ddpm.evaluate.measured``: the parts that run a sampler, and those that do not
- ``ddpm.evaluate.feature_cnn``: the classifier behind label accuracy and feature-FID (train, save, load, classify)
- ``ddpm.evaluate.metrics``: accuracy, feature statistics, Fréchet distance, cached statistics
- ``ddpm.evaluate.fidelity``: Inception FID, IS, KID, precision/recall via torch-fidelity, user-supplied weights
- ``ddpm.evaluate.figures``, ``ddpm.evaluate.report``: GIFs and plots; ``report.md``
- ``ddpm.evaluate.hparams``: the headline numbers with the run's hyper-parameters for TensorBoard's HParams tab
- ``ddpm.evaluate.sample_request``: ``jobs.sample``'s N samples in shards, for any number of ranks, resumable
"""
