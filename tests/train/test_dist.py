"""ddpm.train.dist: hostlists, rendezvous ports, launch detection, and a real 2-process gloo group."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpm.errors import UserError
from ddpm.train import dist as ddist
from ddpm.train.dist import (
    init_distributed,
    master_port,
    parse_nodelist,
    print0,
    reduce_mean,
)

LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]


@pytest.fixture
def clean_env(monkeypatch):
    """No torchrun / SLURM variables, and no CUDA (so results do not depend on the test machine)."""
    for key in list(os.environ):
        if key in LAUNCH_VARS or key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return monkeypatch


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node1,node[3-4]", ["node1", "node3", "node4"]),
    ("localhost", ["localhost"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("a-b[1-2],c", ["a-b1", "a-b2", "c"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x[5]", ["x5"]),
    ("", []),
])
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu]1[", "gpu[a-b]"])
def test_parse_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse_nodelist(bad)


def test_slurm_rendezvous_from_nodelist_and_job_id(clean_env):
    env = dict(SLURM_PROCID="3", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="2", SLURM_STEP_ID="0")
    rank, world, local, rdv = ddist._launch_info(env)
    assert (rank, world, local) == (3, 8, 1)
    assert rdv == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port(4242, 2))}
    env.update(MASTER_ADDR="head", MASTER_PORT="29500")  # exported by the batch script: they win
    assert ddist._launch_info(env)[3] == {}


def test_torchrun_variables_take_precedence():
    env = dict(RANK="1", WORLD_SIZE="4", LOCAL_RANK="1", SLURM_PROCID="0", SLURM_NTASKS="2")
    assert ddist._launch_info(env)[:3] == (1, 4, 1)


def test_no_launcher_is_single_process(clean_env):
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert info.device == torch.device("cpu") and info.is_main and not dist.is_initialized()


def test_one_task_slurm_job_is_single_process(clean_env):
    # No SLURM_JOB_NODELIST: a single process must not need (or parse) any rendezvous information.
    for key, value in dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_JOB_ID="7").items():
        clean_env.setenv(key, value)
    info = init_distributed("cpu")
    assert info.world_size == 1 and info.backend is None and not dist.is_initialized()


def test_cuda_requested_without_cuda(clean_env):
    with pytest.raises(UserError, match="train.device=cuda but CUDA is not available.*train.device=auto"):
        init_distributed("cuda")


def test_auto_falls_back_to_cpu_on_gpu_less_node(clean_env):
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert init_distributed("auto").device == torch.device("cpu")


def test_unknown_device(clean_env):
    with pytest.raises(UserError, match="train.device=tpu"):
        init_distributed("tpu")


def test_torchrun_without_master_addr_fails_fast(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="MASTER_ADDR"):
        init_distributed("cpu")


def test_helpers_without_process_group(clean_env, capsys):
    assert reduce_mean({"b": 2, "a": 1}, "cpu") == {"a": 1.0, "b": 2.0}
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(reduce_mean(t, "cpu"), t)
    ddist.barrier()
    ddist.cleanup()
    print0("hello")
    clean_env.setenv("RANK", "1")
    print0("from rank 1")
    assert capsys.readouterr().out == "hello\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's intra-op thread pool
    for key in LAUNCH_VARS:
        os.environ.pop(key, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_STEP_ID="0",
                      SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="99", MASTER_PORT=str(port))
    info = init_distributed("cpu", timeout_s=60)
    means = reduce_mean({"a": float(rank), "b": 10.0 * rank}, info.device)
    tensor = reduce_mean(torch.tensor([rank, 2.0 * rank]), info.device)
    print0("printed once")
    ddist.barrier()
    result = dict(rank=info.rank, world=info.world_size, backend=info.backend, main=info.is_main,
                  addr=os.environ["MASTER_ADDR"], means=means, tensor=tensor.tolist())
    ddist.cleanup()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_two_process_gloo_group_over_slurm_variables(tmp_path, capfd):
    # fork: the children already have torch imported (spawn re-imports it: ~10 s more on 2 busy cores).
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["backend"], res["main"]) == (r, 2, "gloo", r == 0)
        assert res["addr"] == "localhost"
        assert res["means"] == {"a": 0.5, "b": 5.0}
        assert res["tensor"] == [0.5, 1.0]
    assert capfd.readouterr().out.count("printed once") == 1


# ----- ranks find their GPU, or say why at once -------------------------------------------------------
@pytest.mark.parametrize("local_rank, visible, local_world, index", [
    (0, 4, 4, 0), (1, 4, 4, 1), (3, 4, 4, 3),   # --gpus-per-node=4, 4 tasks: one GPU each
    (1, 4, 2, 1),                                # 2 tasks on a 4-GPU node
    (0, 1, 4, 0), (3, 1, 4, 0),                  # --gpus-per-task=1: each task sees its own GPU as cuda:0
    (2, 4, None, 2),                             # unknown tasks per node
])
def test_local_device_index(local_rank, visible, local_world, index):
    assert ddist.local_device_index(local_rank, visible, local_world) == index


@pytest.mark.parametrize("local_rank, visible, local_world", [(2, 2, 4), (0, 2, 4), (5, 4, None)])
def test_more_tasks_than_gpus_on_a_node_is_refused_at_once(local_rank, visible, local_world):
    with pytest.raises(UserError, match=r"share \d visible GPUs.*one GPU per task"):
        ddist.local_device_index(local_rank, visible, local_world)


@pytest.fixture
def four_fake_gpus(clean_env):
    """torch.cuda reports 4 GPUs; set_device and init_process_group record their arguments."""
    calls = {}
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: int(os.environ.get("FAKE_GPUS", "4")))
    clean_env.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    clean_env.setattr(dist, "is_initialized", lambda: False)
    clean_env.setattr(dist, "init_process_group", lambda *a, **kw: calls.update(init=(a, kw)))
    return calls


def test_slurm_task_takes_its_gpu_and_binds_the_process_group_to_it(four_fake_gpus, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    env = dict(SLURM_PROCID="6", SLURM_NTASKS="8", SLURM_LOCALID="2", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="8",
               SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_ID="7")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    info = init_distributed("auto")
    assert info.device == torch.device("cuda", 2) and four_fake_gpus["set_device"] == 2
    args, kw = four_fake_gpus["init"]
    assert args == ("nccl",) and kw["device_id"] == torch.device("cuda", 2)
    assert (kw["rank"], kw["world_size"]) == (6, 8)


def test_one_gpu_bound_per_task(four_fake_gpus, monkeypatch):
    for k, v in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", LOCAL_WORLD_SIZE="4", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29500", FAKE_GPUS="1").items():
        monkeypatch.setenv(k, v)
    assert init_distributed("auto").device == torch.device("cuda", 0)
    assert four_fake_gpus["init"][1]["device_id"] == torch.device("cuda", 0)


def test_four_tasks_on_two_gpus_fail_before_the_rendezvous(four_fake_gpus, monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", LOCAL_WORLD_SIZE="4", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29500", FAKE_GPUS="2").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match="4 tasks on this node share 2 visible GPUs"):
        init_distributed("auto")
    assert "init" not in four_fake_gpus


def test_gloo_on_cpu_gets_no_device_id(four_fake_gpus, monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    init_distributed("cpu")
    args, kw = four_fake_gpus["init"]
    assert args == ("gloo",) and kw["device_id"] is None


# What SLURM 22.05 sets (read off slurm-ci): a batch script has SLURM_PROCID and SLURM_NTASKS but no
# SLURM_STEP_ID; srun sets SLURM_STEP_ID, SLURM_STEP_NUM_TASKS and SLURM_TASK_PID (the task's own pid), and
# with --pty SLURM_PTY_PORT.
BATCH = dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_LOCALID="0", SLURM_JOB_NODELIST="n1", SLURM_JOB_ID="5",
             SLURM_TASK_PID="100")
STEP = dict(BATCH, SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="4")


@pytest.mark.parametrize("env, message", [
    (BATCH, "runs in the job's batch script, not in an srun step: its 3 peers would never come"),
    (dict(STEP, SLURM_PTY_PORT="40000"), "shell of an interactive 'srun -n4 --pty' step"),
    (dict(STEP, SLURM_STEP_NUM_TASKS="1"), "this srun step has 1 task"),
])
def test_a_process_whose_peers_never_come_fails_at_once(env, message):
    with pytest.raises(UserError, match=message) as e:
        ddist._launch_info(env, pid=200)
    assert "srun python -m" in str(e.value) and "torchrun --nproc_per_node=4" in str(e.value)


def test_srun_tasks_pass_the_launch_checks():
    assert ddist._launch_info(STEP, pid=200)[:3] == (0, 4, 0)  # a task started through a shell wrapper
    assert ddist._launch_info(dict(STEP, SLURM_PTY_PORT="40000"), pid=100)[:3] == (0, 4, 0)  # srun --pty python
