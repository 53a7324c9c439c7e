"""TensorBoard over an SSH tunnel: serve a run root on 127.0.0.1 only, and say how to reach it.

Binding to 127.0.0.1 keeps the dashboard private on a shared login or compute node: only someone who
can log in (and forwards the port through ssh) sees it, never the whole cluster network.
"""
import getpass
import os
import socket
from pathlib import Path

from ddpm.errors import UserError

HOST = "127.0.0.1"


def free_port() -> int:
    """A port nobody listens on right now (for suggestions and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """UserError unless TensorBoard could listen on 127.0.0.1:port.

    SO_REUSEADDR as TensorBoard's server sets it: old TIME_WAIT connections do not count, a listener
    (on 127.0.0.1 or on 0.0.0.0) does.
    """
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (1-65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except PermissionError:
            raise UserError(f"port {port} needs root; pick one above 1023, e.g. --port {free_port()}") from None
        except OSError:
            raise UserError(f"port {port} is already in use on this node (another TensorBoard?); "
                            f"pick another, e.g. --port {free_port()}") from None


def check_run_root(run_root) -> Path:
    root = Path(run_root)
    if not root.is_dir():
        raise UserError(f"run root {root} is not a directory; pass the folder that holds the run dirs, e.g. runs")
    return root.resolve()


def tunnel_command(port: int, login_node: str | None = None, env=None) -> str:
    """The ssh command to run on a laptop so that http://localhost:PORT reaches this TensorBoard.

    On a login node: ``ssh -N -L P:localhost:P user@this-host``. Inside a SLURM job (a compute node,
    usually unreachable from outside): jump through the login node, ``ssh -N -J user@login -L
    P:localhost:P user@this-node``; the login node is --login-node, else SLURM_SUBMIT_HOST.
    """
    env = os.environ if env is None else env
    user = env.get("USER") or getpass.getuser()
    host = socket.gethostname()
    if env.get("SLURM_JOB_ID"):
        login = login_node or env.get("SLURM_SUBMIT_HOST") or "<login-node>"
        return f"ssh -N -J {user}@{login} -L {port}:localhost:{port} {user}@{host}"
    return f"ssh -N -L {port}:localhost:{port} {user}@{login_node or host}"


def has_events(root: Path) -> bool:
    return any(root.glob("**/events.out.tfevents.*"))


def start(run_root: Path, port: int, reload_interval: int = 15) -> str:
    """Start TensorBoard on 127.0.0.1:port in a background thread of this process; returns its URL."""
    from tensorboard import program

    tb = program.TensorBoard()
    # load_fast=false: no separate Rust data server process, one process to start and stop.
    tb.configure(argv=[None, "--logdir", str(run_root), "--host", HOST, "--port", str(port),
                       "--reload_interval", str(reload_interval), "--load_fast", "false"])
    try:
        return tb.launch()
    except program.TensorBoardServerException as e:  # lost a race for the port after check_port
        raise UserError(f"TensorBoard could not start on {HOST}:{port}: {e.msg}") from None
