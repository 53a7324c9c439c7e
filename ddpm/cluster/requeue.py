"""What the sbatch templates (slurm/common.sh) ask Python about requeues, so that every number has one
definition: ``python -m ddpm.cluster.requeue COMMAND``, one number on stdout. Torch-free: a call costs
the batch shell about 0.1 s. Bad arguments: one ``error: ...`` line on stderr, exit 2.
"""
import argparse
import sys

from ddpm.errors import BAD_INPUT_EXIT_CODE, REQUEUE_EXIT_CODE, UserError
from ddpm.run import restarts


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage + message
        print(f"error: {message} (see python -m ddpm.cluster.requeue --help)", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ddpm.cluster.requeue",
                description="What the sbatch templates ask Python about requeues: one number on stdout.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("exit-code", help=f'the exit code of "checkpoint saved, requeue me" ({REQUEUE_EXIT_CODE})')
    c = sub.add_parser("master-port", help="the rendezvous port of this run of the job, in [20000, 60000)")
    c.add_argument("job_id", type=int, metavar="JOB_ID", help="SLURM_JOB_ID")
    c.add_argument("restart_count", type=int, metavar="RESTART_COUNT", help="SLURM_RESTART_COUNT (0 for the first run)")
    c = sub.add_parser("latest-step", help=f"the step RUN_DIR/checkpoints/latest names ({restarts.NONE}: none)")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c = sub.add_parser("idle-restarts", help=f"restarts in a row of this job (SLURM_JOB_ID) that ended without "
                                             f"progress, kept in DIR/{restarts.RESTARTS_FILE}")
    c.add_argument("directory", metavar="DIR", help="RUN_DIR for training, RUN_DIR/samples for sampling")
    c.add_argument("--record", type=int, metavar="PROGRESS", help="first record that this run stopped at PROGRESS "
                   f"(a checkpoint step or a count of committed shards; {restarts.NONE}: none)")
    sub.add_parser("max-idle-restarts", help=f"how many restarts in a row may end without progress "
                   f"({restarts.MAX_IDLE_RESTARTS_ENV}, default {restarts.MAX_IDLE_RESTARTS})")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "exit-code":
            value = REQUEUE_EXIT_CODE
        elif args.command == "master-port":
            value = restarts.master_port(args.job_id, args.restart_count)
        elif args.command == "latest-step":
            value = restarts.latest_step(args.run_dir)
        elif args.command == "idle-restarts":
            value = restarts.idle_restarts(args.directory, args.record)
        else:
            value = restarts.max_idle_restarts()
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    print(value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
