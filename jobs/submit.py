"""Submit training to SLURM with submitit: one run or a sweep, requeued on preemption and time limits.

Each job runs `python -m jobs.train` in its own new run directory, one task per GPU. When SLURM warns
of the time limit (or preempts), the job saves a checkpoint, requeues itself and resumes. A sweep
(--sweep, cartesian product) is validated completely before anything is submitted, then goes out as one
job array; a manifest (JSON) records job ids, overrides and run dirs. Exit codes: 0 ok, 2 bad input
(nothing submitted), 1 a --local run failed.
"""
import argparse
import dataclasses
import os
import sys
from datetime import datetime
from pathlib import Path

from ddpm.errors import BAD_INPUT_EXIT_CODE, UserError
from jobs.cli import Parser

EXAMPLES = """examples:
  python -m jobs.submit --config configs/cifar10.yaml --nodes 1 --gpus-per-node 4 --partition gpu --time 24:00:00
  python -m jobs.submit --config configs/mnist.yaml train.epochs=5 --sweep train.lr=1e-3,2e-3 \\
      --sweep model.hidden=32,64 --gpus-per-node 1 --time 2:00:00 --dry-run
  python -m jobs.submit --status runs/sweeps/20250101-120000-mnist-cond-cfg.json
  python -m jobs.submit --config configs/mnist.yaml train.steps=200 --local     # no SLURM: run here
"""


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.submit", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config, e.g. configs/cifar10.yaml (required unless --status)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every job")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one job per value (repeat for a cartesian product), e.g. train.lr=1e-4,2e-4")
    g = p.add_argument_group("resources (per job)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=1,
                   help="GPUs per node = tasks (DDP ranks) per node (default 1; 0: one CPU task per node)")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per task (default: the cluster's)")
    g.add_argument("--mem", help="memory per node in sbatch syntax, e.g. 64G (default: the cluster's)")
    g.add_argument("--partition", help="partition (default: the cluster's default partition; see sinfo)")
    g.add_argument("--account", help="account to charge (sbatch --account)")
    g.add_argument("--time", help="time limit per run: HH:MM:SS, MM:SS, D-HH:MM:SS or minutes (required "
                                  "for SLURM); a job that hits it checkpoints, requeues and continues")
    g.add_argument("--signal-delay", type=int, default=120, metavar="S",
                   help="ask SLURM for USR2 S seconds (up to S+30) before the time limit (default 120)")
    g.add_argument("--max-timeouts", type=int, default=20,
                   help="give up after this many time-limit requeues (preemptions do not count; default 20)")
    p.add_argument("--run-root", help="where the run dirs go (default: the config's run_root)")
    p.add_argument("--manifest", help="manifest path (default: RUN_ROOT/sweeps/<time>-<name>.json)")
    p.add_argument("--local", action="store_true", help="run the jobs here, one after another, without SLURM")
    p.add_argument("--dry-run", action="store_true", help="validate and print what would be submitted; submit nothing")
    p.add_argument("--status", metavar="MANIFEST", help="print state, last step and loss of each job of a manifest")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return status(args.status) if args.status else submit(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE


def status(manifest_path) -> int:
    from ddpm.cluster import sweep

    print(sweep.format_status(sweep.status_rows(sweep.read_manifest(manifest_path))))
    return 0


def submit(args) -> int:
    from ddpm.cluster import launch, slurm, sweep

    if not args.config:
        raise UserError("--config is required (or --status MANIFEST), e.g. --config configs/cifar10.yaml")
    if args.time is None and not args.local:
        raise UserError("--time is required for SLURM jobs, e.g. --time 24:00:00 (or run here with --local)")
    res = launch.Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                           time_s=slurm.parse_time(args.time) if args.time else 3600,
                           cpus_per_task=args.cpus_per_task, mem=args.mem, account=args.account,
                           signal_delay_s=args.signal_delay, max_timeouts=args.max_timeouts)
    if args.local:
        res = dataclasses.replace(res, nodes=1, gpus_per_node=min(args.gpus_per_node, 1))  # one local process
    res.check()
    sweep.parse_sweeps(args.sweep, args.overrides)  # syntax errors before asking the cluster anything
    partition = None
    if not args.local:  # sinfo first: it is quick, validating configs is not
        partition = slurm.check_request(args.partition, res.nodes, res.gpus_per_node, res.time_s).name
        res = dataclasses.replace(res, partition=partition)
    jobs = sweep.plan_jobs(args.config, args.overrides, args.sweep, args.run_root, res.world_size, res.gpus_per_node > 0)
    run_root = jobs[0].run_dir.parent
    params = res.executor_parameters(jobs[0].name)
    where = "here (--local)" if args.local else f"to partition {partition}"
    print(f"{'would submit' if args.dry_run else 'submitting'} {len(jobs)} job(s) {where}, config {args.config}")
    if not args.local:
        print(f"  sbatch {launch.sbatch_flags(params, len(jobs))}")
    for spec in jobs:
        print(f"  {spec.run_dir}  {' '.join(spec.overrides) or '(no overrides)'}")
    if args.dry_run:
        return 0
    manifest_path = Path(args.manifest) if args.manifest else sweep.new_manifest_path(run_root, jobs[0].name)
    manifest = {"config": str(Path(args.config).resolve()), "overrides": args.overrides, "sweep": args.sweep,
                "executor": "local" if args.local else "slurm", "submitted": datetime.now().astimezone().isoformat(),
                "cwd": os.getcwd(), "resources": {k: v for k, v in params.items() if k != "setup"}}
    if args.local:
        failed = launch.run_local(jobs, args.config, manifest_path, manifest)
        print(f"manifest: {manifest_path}")
        return 1 if failed else 0
    try:  # a manifest that cannot be written must fail before the jobs exist, not after
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {manifest_path.parent} for the manifest ({e.strerror}); pass --manifest") from None
    folder = run_root / "submitit"
    manifest["submitit_folder"] = str(folder)
    manifest["jobs"] = launch.submit_slurm(jobs, args.config, res, folder, jobs[0].name)
    sweep.write_manifest(manifest_path, manifest)
    for j in manifest["jobs"]:
        print(f"  job {j['job_id']}: {j['run_dir']}  (log {j['log']})")
    print(f"manifest: {manifest_path}\nstatus:   python -m jobs.submit --status {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
