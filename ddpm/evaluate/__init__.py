"""Evaluate: the post-hoc evaluation job, plan → parts (one table) → figures, metrics, report. Builds on
everything below it (``errors``, ``config``, ``data``, ``nets``, ``diffusion``, ``run``), never on ``ddpm.train``.

Public surface (import from the modules):

- ``ddpm.evaluate.plan``: ``EvaluationArgs`` (jobs.evaluate as typed) → ``plan_evaluation`` (validates
  everything, writes nothing) → ``Evaluation``, a frozen record composed of the resolvers' records:
- ``ddpm.evaluate.loaded_run``: ``load_run`` → ``LoadedRun`` (run dir, config, objective, checkpoint, net)
- ``ddpm.evaluate.sampling_choice``: ``choose_sampling`` → ``SamplingChoice`` (scales, main and fast ``Sampling``);
  what a sampler is, asked of ``ddpm.diffusion.from_config`` (``runs_every_step``, ``takes_eta``, ``table_steps``)
- ``ddpm.evaluate.scorers``: ``choose_scorers`` → ``Scorers`` (classifier, Inception metrics; ``score``)
- ``ddpm.evaluate.sample_sets``: ``SamplesArgs`` (jobs.sample as typed) → ``plan_samples`` / ``sample_set_for``
  → ``SampleSet`` (N samples in shards, also jobs.evaluate --fid-samples); ``make_samples`` for any number of
  ranks (``RankGroup``), resumable
- ``ddpm.evaluate.parts``: ``PARTS`` / ``SECTIONS`` (the one table), ``run_parts`` (runs an evaluation's parts)
- ``ddpm.evaluate.sampled``, ``ddpm.evaluate.measured``: the parts that run a sampler, and those that do not
- ``ddpm.evaluate.guides``: guidance other than the run's classifier-free guidance, resolved and checked before
  anything is written: ``ClassifierGuide`` (a noisy-classifier run), ``Mixture`` (classes and weights),
  ``sample_with``; ``ddpm.evaluate.guided``: their parts (``cg``, ``mixture``); ``ddpm.evaluate.real_rows``: the
  samples above real training images and the data-set preview (``real``)
- ``ddpm.evaluate.feature_cnn``: the classifier behind label accuracy and feature-FID (train, save, load, classify)
- ``ddpm.evaluate.metrics``: accuracy, feature statistics, Fréchet distance, cached statistics
- ``ddpm.evaluate.fidelity``: Inception FID, IS, KID, precision/recall via torch-fidelity, user-supplied weights
- ``ddpm.evaluate.figures``, ``ddpm.evaluate.report``: GIFs and plots; ``report.md``
- ``ddpm.evaluate.hparams``: the headline numbers with the run's hyper-parameters for TensorBoard's HParams tab
"""
