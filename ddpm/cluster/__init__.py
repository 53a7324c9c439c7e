"""Cluster: SLURM through its client commands, submitit launching and sweeps, the TensorBoard server.

Importable without torch (a login node's ``jobs.submit`` and ``jobs.tensorboard`` stay fast). Builds on
``ddpm.errors``, ``ddpm.config`` (imported where a sweep is validated) and ``ddpm.run``.

Public surface (import from the modules):

- ``ddpm.cluster.slurm``: ``partitions``, ``check_request``, ``job_states``, ``parse_time``, ``format_time``
- ``ddpm.cluster.launch``: ``TrainJob``, ``Resources``, ``submit_slurm``, ``run_local``, ``sbatch_flags``
- ``ddpm.cluster.sweep``: ``plan_jobs``, ``parse_sweeps``, manifests and ``status_rows`` / ``format_status``
- ``ddpm.cluster.requeue``: ``python -m ddpm.cluster.requeue``, what the sbatch templates ask Python (the
  requeue exit code, the restart limit and count, the latest step, the rendezvous port)
- ``ddpm.cluster.tensorboard``: serve a run root on 127.0.0.1 and print the ssh tunnel (``start``,
  ``tunnel_command``, ``check_port``)
"""
