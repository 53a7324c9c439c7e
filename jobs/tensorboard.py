"""Serve TensorBoard for a run root on 127.0.0.1 only, and print the ssh tunnel to open it from a laptop.

Run it on the login node (or, inside a job, on a compute node). It watches every run dir under RUN_ROOT
(their tb/ folders), picks up new runs as they appear, and runs until Ctrl-C. Nothing is exposed to the
cluster network: you reach it through the printed `ssh -N -L ...` command, then http://localhost:PORT.
Exit codes: 0 stopped, 2 bad input (missing RUN_ROOT, port in use).
"""
import argparse
import signal
import sys
import time

from ddpm.errors import BAD_INPUT_EXIT_CODE, UserError
from jobs.cli import Parser

EXAMPLES = """examples:
  python -m jobs.tensorboard runs                      # port 6006
  python -m jobs.tensorboard runs --port 6117 --login-node bender.example.edu
"""


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.tensorboard", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_root", metavar="RUN_ROOT", help="folder holding the run dirs, e.g. runs")
    p.add_argument("--port", type=int, default=6006, help="port on 127.0.0.1 (default 6006; on a shared "
                                                          "node pick your own, e.g. 6000 + your uid %% 1000)")
    p.add_argument("--login-node", help="the login node's name as your laptop reaches it, for the printed ssh "
                                        "command (default: this host; inside a job: SLURM_SUBMIT_HOST)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ddpm.cluster import tensorboard as tbs

    try:
        root = tbs.check_run_root(args.run_root)
        tbs.check_port(args.port)
        url = tbs.start(root, args.port)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    if not tbs.has_events(root):
        print(f"note: no TensorBoard event files under {root} yet; runs show up as they start logging")
    print(f"TensorBoard for {root} at {url} (127.0.0.1 only)")
    print("on your laptop, open the tunnel:")
    print(f"  {tbs.tunnel_command(args.port, args.login_node)}")
    print(f"then browse http://localhost:{args.port}   (Ctrl-C here stops TensorBoard)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
