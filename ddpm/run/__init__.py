"""Run: everything under ``RUN_DIR``. Builds on ``ddpm.errors`` and ``ddpm.config``.

Public surface (import from the modules; this file imports nothing, so ``ddpm.cluster`` can read
metrics without importing torch):

- ``ddpm.run.rundir``: run-dir names, resume detection, ``config.json`` (``prepare_run_dir``,
  ``read_run_config``, ``write_config``, ``check_writable``)
- ``ddpm.run.checkpoints``: ``CheckpointManager`` (atomic checkpoints with sha256 manifests, ``latest`` and
  ``best`` pointers), ``verify``
- ``ddpm.run.samples``: the HDF5 sample archive ``samples.h5`` (``write_samples``, ``read_samples``,
  ``list_groups``, ``export_npz``)
- ``ddpm.run.metrics_log``: ``RunLogger`` (TensorBoard + ``metrics.jsonl``), ``read_metrics``
- ``ddpm.run.grids``: labelled sample-grid PNGs (``grid_figure``)
- ``ddpm.run.gifs``: animated GIFs of frames, e.g. a sampler's trajectory (``write_gif``)
- ``ddpm.run.atomic``: the one atomic write (``atomic_write``, ``atomic_path``), ``writing`` (disk full →
  ``OutOfSpace``), ``damaged_name``
- ``ddpm.run.restarts``: a run's restarts, torch-free: ``latest_step`` (the one parser of
  ``checkpoints/latest``), ``idle_restarts`` (``restarts_without_progress``), ``max_idle_restarts``, ``master_port``
- ``ddpm.run.lock``: ``RunLock`` (one writer per run dir: ``lock.json`` with a heartbeat, stale locks taken over)
- ``ddpm.run.shards``: ``ShardStore`` (a sampling request's committed shards, assembled into ``samples/NAME.h5``)
- ``ddpm.run.evaluations``: reading an evaluation's ``metrics.json`` rows (``scored_rows``, ``headline_row``,
  ``scale_label``, ``convention_symbol``)
"""
