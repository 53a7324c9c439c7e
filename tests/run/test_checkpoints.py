"""ddpm.run.checkpoints (+ ddpm.nets.loading): atomic save, manifest verification, `latest`, retention, fallback loading, crashes."""
import hashlib
import json
import os
import random
import select
import shutil
import signal
import time
import traceback
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ddpm.errors import UserError
from ddpm.nets.loading import clean_state_dict, unwrap_model
from ddpm.run import checkpoints as checkpoint
from ddpm.run import restarts
from ddpm.run.checkpoints import CheckpointManager, verify


def make_state(seed: int) -> dict:
    """A realistic state: model + optimizer (with moments) + nested plain values."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": seed,
        "run": {"name": f"run-{seed}", "lr": 1e-3, "ok": True, "none": None,
                "history": [1, 2.5, "three", (torch.arange(3) * seed, "x")]},
    }


def assert_same(a, b, where="state"):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), \
        f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def step_dir(root, step):
    return root / f"step_{step:09d}"


def saved(tmp_path, steps, **kw):
    mgr = CheckpointManager(tmp_path / "checkpoints", **kw)
    for s in steps:
        mgr.save(s, make_state(s))
    return mgr


# ---- round trip, layout, retention --------------------------------------------------------------
def test_round_trip_layout_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints")
    assert mgr.load_latest() is None and mgr.steps() == []  # dir not even created yet
    path = mgr.save(1234, make_state(7))
    assert path == step_dir(tmp_path / "checkpoints", 1234)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "state.pt"]
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / "state.pt").read_bytes()
    assert manifest["step"] == 1234 and manifest["created"]
    assert manifest["files"]["state.pt"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (mgr.directory / "latest").read_text().strip() == "step_000001234"
    assert verify(path) is None

    step, state = mgr.load_latest()
    assert step == 1234
    assert_same(state, make_state(7))
    assert state["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0  # moments really round-tripped

    mgr.save(1300, make_state(8))
    assert (mgr.directory / "latest").read_text().strip() == "step_000001300"
    assert mgr.steps() == [1234, 1300]
    assert_same(mgr.load_latest()[1], make_state(8))
    assert_same(mgr.load(1234)[1], make_state(7))
    assert mgr.load("latest")[0] == 1300
    assert mgr.load(str(path))[0] == 1234 and mgr.load(path / "state.pt")[0] == 1234
    assert not list(mgr.directory.glob("*.tmp")) and not list(mgr.directory.glob("*.old"))


def test_retention_keeps_last_k_and_every_nth(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=3, keep_every=5)
    for s in range(1, 21):
        mgr.save(s, {"s": torch.tensor(s)})
    assert mgr.steps() == [5, 10, 15, 18, 19, 20]
    assert sorted(p.name for p in mgr.directory.iterdir()) == \
        ["latest"] + [f"step_{s:09d}" for s in (5, 10, 15, 18, 19, 20)]
    mgr2 = CheckpointManager(tmp_path / "other", keep_last=2)
    for s in range(1, 6):
        mgr2.save(s, {"s": torch.tensor(s)})
    assert mgr2.steps() == [4, 5]


def test_retention_after_resuming_from_an_earlier_step(tmp_path):
    # Resumed explicitly at 5 while 10..12 exist: retention ranks the new timeline (<= the step just
    # saved), so 6 survives the save of 7; the abandoned 10..12 are left alone, `latest` follows 7.
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=2, keep_every=5)
    for s in range(1, 13):
        mgr.save(s, {"s": torch.tensor(s)})
    assert mgr.steps() == [5, 10, 11, 12]
    for s in (6, 7):
        mgr.save(s, {"s": torch.tensor(s)})
    assert mgr.steps() == [5, 6, 7, 10, 11, 12]
    assert mgr.load_latest()[0] == 7


def test_best_is_a_kept_checkpoint_named_by_its_own_pointer(tmp_path):
    # Steps 3 and 6 were the best in turn; epochs end every 4 steps and keep= keeps them (the training's
    # checkpoint.every_epochs). Retention never drops the step `best` names, and drops an old best.
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=1, keep=lambda s: s % 4 == 0)
    for s in range(1, 11):
        mgr.save(s, {"s": torch.tensor(s)}, best=s in (3, 6))
    assert mgr.steps() == [4, 6, 8, 10] and mgr.best_step() == 6
    assert (mgr.directory / checkpoint.BEST_FILE).read_text() == "step_000000006\n"
    assert mgr.load("best")[0] == 6 and mgr.load_latest()[0] == 10  # `best` never decides what resumes
    mgr.set_best(None)
    assert mgr.best_step() is None and not (mgr.directory / checkpoint.BEST_FILE).exists()
    mgr.save(11, {"s": torch.tensor(11)})
    assert mgr.steps() == [4, 8, 11]  # 6 is no longer the best: retention lets it go
    with pytest.raises(UserError, match="no best checkpoint in .*checkpoint.best=true"):
        mgr.load("best")


def test_a_best_pointer_naming_a_missing_or_garbled_dir_is_ignored_with_a_warning(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    mgr.save(1, {"s": torch.tensor(1)}, best=True)
    (mgr.directory / checkpoint.BEST_FILE).write_text("step_000000099\n")
    with pytest.warns(UserWarning, match="names missing step_000000099; ignoring it"):
        assert mgr.best_step() is None
    (mgr.directory / checkpoint.BEST_FILE).write_text("\x00garbage")
    with pytest.warns(UserWarning, match="garbled"):
        assert mgr.best_step() is None


@pytest.mark.parametrize("kw", [{"keep_last": 0}, {"keep_every": -1}])
def test_bad_retention_settings_are_user_errors(tmp_path, kw):
    with pytest.raises(UserError, match="keep_"):
        CheckpointManager(tmp_path, **kw)


# ---- damaged checkpoints -----------------------------------------------------------------------
def test_truncated_newest_falls_back_with_warning(tmp_path):
    mgr = saved(tmp_path, [1, 2])
    state_file = step_dir(mgr.directory, 2) / "state.pt"
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])
    assert verify(state_file.parent) == f"state.pt size {len(data) // 2} != {len(data)} (truncated or overwritten)"
    with pytest.warns(UserWarning, match=r"step_000000002.*size"):
        step, state = mgr.load_latest()
    assert step == 1
    assert_same(state, make_state(1))


def test_flipped_byte_same_size_is_sha_mismatch(tmp_path):
    mgr = saved(tmp_path, [1, 2])
    state_file = step_dir(mgr.directory, 2) / "state.pt"
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state_file.write_bytes(bytes(data))
    assert verify(state_file.parent) == "state.pt sha256 mismatch"
    with pytest.warns(UserWarning, match=r"step_000000002.*sha256 mismatch"):
        assert mgr.load_latest()[0] == 1


def test_missing_manifest_falls_back(tmp_path):
    # A crash between renaming step_X.tmp into place and writing its manifest.
    mgr = saved(tmp_path, [1, 2])
    (step_dir(mgr.directory, 2) / "manifest.json").unlink()
    assert mgr.steps() == [1]
    with pytest.warns(UserWarning, match=r"step_000000002.*missing manifest"):
        assert mgr.load_latest()[0] == 1


def test_only_incomplete_checkpoint_means_no_checkpoint(tmp_path):
    # The very first save crashed before its manifest: nothing was ever committed, start fresh.
    mgr = saved(tmp_path, [1])
    (step_dir(mgr.directory, 1) / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="missing manifest"):
        assert mgr.load_latest() is None
    mgr.save(2, make_state(2))  # and the debris goes away with the next save's retention
    assert mgr.steps() == [2] and not step_dir(mgr.directory, 1).exists()


def test_leftover_tmp_dir_is_ignored_and_cleaned(tmp_path):
    mgr = saved(tmp_path, [1])
    tmp = mgr.directory / "step_000000002.tmp"
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"half a checkpoint")
    (mgr.directory / "latest.tmp").write_text("step_0000")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mgr.load_latest()[0] == 1
    assert mgr.steps() == [1]
    mgr.save(2, make_state(2))
    assert not tmp.exists() and not (mgr.directory / "latest.tmp").exists()
    assert mgr.load_latest()[0] == 2


def test_latest_naming_a_deleted_dir_still_finds_newest_valid(tmp_path):
    mgr = saved(tmp_path, [1, 2, 3])
    shutil.rmtree(step_dir(mgr.directory, 3))
    with pytest.warns(UserWarning, match="missing"):
        assert mgr.load_latest()[0] == 2
    (mgr.directory / "latest").unlink()
    assert mgr.load_latest()[0] == 2


@pytest.mark.parametrize("pointer", [b"step_000000002.old\n", b"2\n", b"\xff\xfe\x00garbage"])
def test_garbled_latest_is_ignored_with_a_warning(tmp_path, pointer):
    mgr = saved(tmp_path, [1, 2])
    (mgr.directory / "latest").write_bytes(pointer)
    with pytest.warns(UserWarning, match="ignoring garbled"):
        assert mgr.load_latest()[0] == 2
    assert restarts.latest_step(tmp_path) == -1  # the launchers' reading of it: the same parser, no step


def test_the_pointer_a_save_writes_is_the_step_the_launchers_read(tmp_path):
    """One parser of `latest` (ddpm.run.restarts.parse_latest) for the manager, both launchers and the templates."""
    saved(tmp_path, [7, 1234])
    assert restarts.latest_step(tmp_path) == 1234


def test_latest_is_the_commit_point(tmp_path):
    # A newer complete checkpoint that `latest` does not name yet (crash before the pointer moved)
    # is not loaded: loading walks back from `latest`.
    mgr = saved(tmp_path, [1, 2])
    (mgr.directory / "latest").write_text("step_000000001\n")
    assert mgr.load_latest()[0] == 1


def test_all_corrupt_is_a_user_error_not_a_fresh_start(tmp_path):
    mgr = saved(tmp_path, [1, 2])
    for s in (1, 2):
        (step_dir(mgr.directory, s) / "state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(UserError, match=str(mgr.directory)) as e:
        mgr.load_latest()
    assert "\n" not in str(e.value)


def test_explicit_load_never_falls_back(tmp_path):
    mgr = saved(tmp_path, [1, 2, 3])
    with open(step_dir(mgr.directory, 2) / "state.pt", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match=r"step_000000002.*size 10 !="):
        mgr.load(2)
    with pytest.raises(UserError, match=r"step 7 .*available steps: \[1, 2, 3\]"):
        mgr.load(7)
    with pytest.raises(UserError, match="does not exist"):
        mgr.load(tmp_path / "nowhere")
    assert mgr.load("3")[0] == 3


class NotATensor:
    def __init__(self):
        self.payload = 42


def test_pickled_object_is_refused_with_a_clear_user_error(tmp_path):
    # Written by hand (plain torch.save, valid manifest and pointer), so the refusal comes from
    # loading with weights_only, not from anything save() might check.
    root = tmp_path / "checkpoints"
    d = step_dir(root, 5)
    d.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(2)}, "extra": NotATensor()}, d / "state.pt")
    data = (d / "state.pt").read_bytes()
    (d / "manifest.json").write_text(json.dumps(
        {"step": 5, "created": "now", "files": {"state.pt": {"size": len(data),
                                                             "sha256": hashlib.sha256(data).hexdigest()}}}))
    (root / "latest").write_text("step_000000005\n")
    assert verify(d) is None
    mgr = CheckpointManager(root)
    for load in (mgr.load_latest, lambda: mgr.load(5)):
        with pytest.raises(UserError, match=r"weights_only.*NotATensor.*save only tensors") as e:
            load()
        assert "\n" not in str(e.value)


# ---- re-saving a step, and crashes in every window of save() ----------------------------------
def test_resaving_an_existing_step_replaces_it(tmp_path):
    mgr = saved(tmp_path, [4, 5])
    mgr.save(5, make_state(50))
    assert mgr.steps() == [4, 5]
    assert_same(mgr.load_latest()[1], make_state(50))
    assert sorted(p.name for p in mgr.directory.iterdir()) == ["latest", "step_000000004", "step_000000005"]


class Crash(Exception):
    pass


def crash_at_replace(monkeypatch, n):
    """Make the n-th os.replace inside ddpm.run.checkpoints raise, like a kill at that point."""
    real, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == n:
            raise Crash(f"crash before os.replace #{n}: {src} -> {dst}")
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    return calls


@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "same-step"])
def test_crash_before_each_rename_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, resave):
    """Whichever rename the crash precedes, the old or the new state loads, and the next save
    cleans up. `resave`: the crashed save re-writes the step the directory already has."""
    n = 1
    while True:
        root = tmp_path / f"case{n}"
        mgr = CheckpointManager(root / "checkpoints", keep_last=2)
        for s in (1, 2):
            mgr.save(s, {"step": s, "w": torch.zeros(3)})
        new_step = 2 if resave else 3
        with monkeypatch.context() as m:
            calls = crash_at_replace(m, n)
            try:
                mgr.save(new_step, {"step": 99, "w": torch.ones(3)})
                finished = True
            except Crash:
                finished = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step, state = mgr.load_latest()
        assert (step, state["step"]) in {(2, 2), (new_step, 99)}, f"crash at replace #{n}"
        mgr.save(4, {"step": 4})
        assert mgr.load_latest()[0] == 4
        assert not list(mgr.directory.glob("*.tmp")) and not list(mgr.directory.glob("*.old"))
        assert all(verify(step_dir(mgr.directory, s)) is None for s in mgr.steps())
        assert sorted(p.name for p in mgr.directory.iterdir()) == \
            ["latest"] + [step_dir(mgr.directory, s).name for s in mgr.steps()]
        if finished:
            break
        n += 1
    # Every rename of a full save was a crash point: (move aside,) into place, manifest, latest,
    # (delete the aside copy,) retention's delete of step 1 (new-step) — at least 4 or 5.
    assert calls[0] >= (5 if resave else 4) and n == calls[0] + 1


def test_moved_aside_copy_is_loaded_and_restored(tmp_path):
    # Crash while re-saving step 2: the new step_2 has no manifest, the old copy sits in step_2.old.
    mgr = saved(tmp_path, [1, 2])
    old = step_dir(mgr.directory, 2)
    os.replace(old, old.with_name(old.name + ".old"))
    old.mkdir()
    (old / "state.pt").write_bytes(b"new, never committed")
    with pytest.warns(UserWarning, match="missing manifest"):
        step, state = mgr.load_latest()
    assert step == 2 and state["step"] == 2
    mgr.save(3, make_state(3))
    assert mgr.steps() == [1, 2, 3] and mgr.load(2)[1]["step"] == 2


def test_sigkill_at_random_moments_leaves_a_verified_checkpoint(tmp_path):
    """A forked child resumes via load_latest and saves in a loop (its first save re-saves the step
    it resumed from); SIGKILL it at random moments. Forked, not spawned: no second torch import."""
    root = tmp_path / "checkpoints"
    payload = torch.randn(1 << 18)  # 1 MiB, made before fork so the child does no real compute
    rng = random.Random()
    scratch = CheckpointManager(tmp_path / "scratch", keep_last=1)
    t0 = time.perf_counter()
    for s in range(3):
        scratch.save(s, {"x": payload})
    save_s = (time.perf_counter() - t0) / 3  # fsync-bound: ~5 ms on a laptop SSD, 50 ms on a busy VM
    last_saved, kills, rounds = None, [], 8
    for round_ in range(rounds):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 1
            try:
                os.close(r)
                torch.set_num_threads(1)
                mgr = CheckpointManager(root, keep_last=2, keep_every=4)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    found = mgr.load_latest()
                step = found[0] if found else 0
                os.write(w, b"ready\n")
                while True:
                    mgr.save(step, {"step": step, "mark": torch.full((3,), step), "x": payload})
                    os.write(w, f"saved {step}\n".encode())
                    step += 1
            except BaseException:
                os.write(w, traceback.format_exc().encode())
            finally:
                os._exit(code)
        os.close(w)
        out = b""
        try:
            assert select.select([r], [], [], 60)[0], "child did not start"
            # save_s is measured here; on a loaded machine the child's saves can take several times longer, and
            # every kill may land before its first save completes. The last round then kills only after one
            # has, so that at least one round checks a completed save.
            while round_ == rounds - 1 and last_saved is None and b"saved" not in out:
                assert select.select([r], [], [], 60)[0], f"child saved nothing in 60 s: {out!r}"
                chunk = os.read(r, 65536)
                assert chunk, f"child exited: {out!r}"
                out += chunk
            delay = rng.uniform(0.0, 4 * save_s)
            kills.append(delay)
            select.select([], [], [], delay)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        while chunk := os.read(r, 65536):
            out += chunk
        os.close(r)
        lines = out.decode().split()
        assert lines[:1] == ["ready"], f"child failed to resume: {out!r}"
        steps = [int(x) for x in lines[2::2]]
        if steps:
            last_saved = steps[-1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = CheckpointManager(root).load_latest()
        if last_saved is None:
            continue
        assert found is not None, f"kills at {kills}"
        step, state = found
        assert step >= last_saved, f"lost completed saves (kills at {kills})"
        assert state["step"] == step and torch.equal(state["mark"], torch.full((3,), step))
        assert torch.equal(state["x"], payload)
    assert last_saved is not None, f"no save completed; kills at {kills}, one save takes {save_s:.3f} s"


# ---- unwrapping --------------------------------------------------------------------------------
class FakeDDP(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


class HasModuleChild(nn.Module):  # a real net that happens to name a child "module": not a wrapper
    def __init__(self):
        super().__init__()
        self.module = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)


def test_clean_state_dict_strips_leading_wrapper_prefixes_only():
    sd = OrderedDict([("module._orig_mod.w", 1), ("_orig_mod.module.b", 2), ("module.module.c", 3),
                      ("_orig_mod.d", 4), ("e", 5), ("x.module.y", 6), ("modules.z", 7)])
    assert list(clean_state_dict(sd).items()) == [("w", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5),
                                                  ("x.module.y", 6), ("modules.z", 7)]
    assert isinstance(clean_state_dict(sd), OrderedDict)
    with pytest.raises(ValueError, match="both become 'w'"):
        clean_state_dict({"module.w": 1, "w": 2})


def test_unwrap_fakes_and_a_real_compiled_module():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    compiled = torch.compile(net)  # lazy: wrapping compiles nothing
    assert compiled is not net and unwrap_model(compiled) is net
    assert unwrap_model(net) is net
    assert unwrap_model(FakeDDP(net)) is net
    wrapped = FakeDDP(torch.compile(FakeDDP(FakeDDP(net))))
    assert unwrap_model(wrapped) is net
    keys = list(wrapped.state_dict())
    assert keys[0].startswith("module._orig_mod.module.module.")
    assert list(clean_state_dict(wrapped.state_dict())) == list(net.state_dict())
    real = HasModuleChild()
    assert unwrap_model(real) is real and unwrap_model(FakeDDP(real)) is real


def test_unwrap_real_ddp_on_single_process_gloo(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        ddp = nn.parallel.DistributedDataParallel(torch.compile(net))
        assert unwrap_model(ddp) is net
        assert unwrap_model(torch.compile(ddp)) is net
        sd = ddp.state_dict()
        assert all(k.startswith("module._orig_mod.") for k in sd)
        fresh = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        fresh.load_state_dict(clean_state_dict(sd))  # strict: every key must match
        assert_same(fresh.state_dict(), net.state_dict())
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()
