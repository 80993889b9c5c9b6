"""Many processes for days (docs/clusters.md): one writer per run folder, SIGTERM
handled like Ctrl-C, --resume only with the flags a run was started with, tools/reproduce.py drivers
that share an --out, and Slurm array tasks that are requeued or resubmitted. Real processes wherever
the promise is about processes: a lock, a signal or a driver's child cannot be faked in one process."""
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import command_line
import forked
import run_folder
import toy_world
import train_backbone as tb
import train_dpc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import reproduce  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
# A stage-1 run of ~0.7 s per epoch on 2 cores (40 steps of one image): long enough to be signalled in
# its second epoch, short enough to be resumed to the end.
SLOW = ["--learner", "coop", "--data", "synthetic", "--clip", "tiny", "--shots", "8", "--batch-size", "1",
        "--workers", "0", "--print-every", "1000", "--feature-cache", "off"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic dataset and one finished CoOp run (a backbone for train_dpc.py, a run for evaluate.py)."""
    base = tmp_path_factory.mktemp("cluster")
    root = str(base / "data")
    toy_world.make_synthetic_imagefolder(root, "synthetic")
    finished = str(base / "finished")
    tb.main(tb.get_args(["--learner", "coop", "--data", "synthetic", "--root", root, "--clip", "tiny", "--epochs", "1",
                         "--shots", "2", "--workers", "0", "--feature-cache", "off", "--output-dir", finished]))
    return dict(root=root, finished=finished)


def start(cwd, name, *argv, runs_forked=False):
    """`python name argv...` in a process of its own (a fork of this one: tests/forked.py); runs_forked: the
    runs a tools/reproduce.py driver starts are forks too."""
    return forked.start(cwd, name, *argv, env=ENV, new_session=True, runs_forked=runs_forked)


def run_script(cwd, name, *argv, timeout=300, runs_forked=False):
    """start(...) to its end, as subprocess.run(..., capture_output=True, text=True)."""
    return forked.run(cwd, name, *argv, env=ENV, timeout=timeout, runs_forked=runs_forked)


def wait_for(path, proc, seconds=120):
    """Until `path` exists (a checkpoint written atomically: it is whole once it is there)."""
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < seconds, f"{path} never appeared"
        time.sleep(0.02)


def holder_pid(run_dir) -> int:
    """The pid the run folder's lock file names ('pid N on HOST since ...')."""
    for _ in range(500):
        with contextlib.suppress(OSError):
            text = open(os.path.join(run_dir, run_folder.LOCK_FILE)).read()
            if text:
                return int(text.split()[1])
        time.sleep(0.01)
    raise AssertionError(f"no lock in {run_dir}")


def alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):   # a zombie (exited, not yet reaped) is not a live process
        return open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
    return False


def one_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------
# One run folder, one writer; SIGTERM like Ctrl-C
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_writer_of_any_script_is_refused_and_sigterm_keeps_the_last_epoch(world, tmp_path):
    """While a run trains, train_backbone.py (another seed: the copy-paste slip), train_dpc.py and
    evaluate.py on the same folder each end in one line naming the holder and write nothing; then
    SIGTERM ends the run like Ctrl-C (exit 143), keeping its last finished epoch, lock let go."""
    run = tmp_path / "run"
    a = start(tmp_path, "train_backbone.py", *SLOW, "--root", world["root"], "--epochs", "400", "--output-dir", str(run))
    try:
        wait_for(run / "checkpoint.pt", a)
        holder = f"pid {a.pid} on {socket.gethostname()} since "
        args_before = (run / "args.json").read_text()
        seconds = []
        for cmd in (("train_backbone.py", *SLOW, "--root", world["root"], "--seed", "2", "--output-dir", str(run)),
                    ("train_dpc.py", "--backbone", world["finished"], "--epochs", "1", "--shots", "2", "--workers",
                     "0", "--output-dir", str(run)),
                    ("evaluate.py", world["finished"], "--workers", "0", "--out", str(run))):
            t0 = time.time()
            b = run_script(tmp_path, *cmd, timeout=120)
            seconds.append(time.time() - t0)
            assert f"{run} is being written by another process ({holder}" in one_error(b)
        assert (run / "args.json").read_text() == args_before                    # nothing of B's was written
        assert '"seed": 2' not in (run / "log.txt").read_text() and not (run / "results.json").exists()
        a.send_signal(signal.SIGTERM)
        _, err = a.communicate(timeout=60)
    finally:
        a.kill()
    assert a.returncode == 143 and err.strip().splitlines()[-1].startswith("interrupted (SIGTERM):"), err
    ckpt = checkpoints.read_checkpoint(str(run / "checkpoint.pt"))
    assert not ckpt["finished"] and 1 <= ckpt["epoch"] < 400
    assert not (run / run_folder.LOCK_FILE).exists()
    print(f"refused second writers in {', '.join(f'{s:.1f}' for s in seconds)} s")


@pytest.mark.slow
def test_kill_9_leaves_no_stale_lock_and_resume_cleans_the_killed_writes(world, tmp_path):
    """kill -9 never leaves a lock behind (the OS releases it); the temp files of the atomic write it
    interrupted are removed when the run is resumed, with other values of the flags --resume may change."""
    run = tmp_path / "run"
    flags = [*SLOW, "--root", world["root"], "--epochs", "3", "--output-dir", str(run)]
    a = start(tmp_path, "train_backbone.py", *flags)
    wait_for(run / "checkpoint.pt", a)
    a.kill()
    a.wait()
    for stale in (f"checkpoint.pt.{a.pid}.tmp", f"results.json.{a.pid}.tmp"):   # as a kill in a write leaves them
        (run / stale).write_bytes(b"half a file")
    assert (run / run_folder.LOCK_FILE).exists()                                     # the file stays; the lock did not
    resumed = run_script(tmp_path, "train_backbone.py", *flags, "--resume", "--print-every", "5", "--workers", "1",
                         "--feature-cache", str(tmp_path / "cache"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    assert sorted(os.listdir(run)) == ["args.json", "checkpoint.pt", "log.txt", "results.json"]
    assert checkpoints.read_checkpoint(str(run / "checkpoint.pt"))["finished"]


@contextlib.contextmanager
def no_hang(seconds=60):
    """A run that blocks fails the test instead of hanging the suite (where the block is in Python code:
    a FIFO opened by torch's C++ reader is not interruptible, so those cases run in processes of their own)."""
    def timeout(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fails_in_one_line(capsys, run, argv) -> str:
    with no_hang(), pytest.raises(SystemExit) as exit_:
        run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.slow
@pytest.mark.parametrize("fifo", ["checkpoint.pt", "results.json", "log.txt", "args.json"])
def test_a_fifo_where_a_run_file_is_expected_is_one_error_not_a_hang(world, tmp_path, fifo):
    """evaluate.py RUN reads checkpoint.pt and results.json; --resume reads checkpoint.pt, then writes
    args.json and log.txt. Real processes with a timeout: opening a FIFO blocks in the kernel."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = torch.load(os.path.join(world["finished"], "checkpoint.pt"), weights_only=True)
    for name in ("checkpoint.pt", "results.json", "args.json"):
        if name != fifo:
            (run / name).write_bytes(open(os.path.join(world["finished"], name), "rb").read())
    if fifo in ("log.txt", "args.json"):
        torch.save(dict(ckpt, finished=False), run / "checkpoint.pt")
    os.mkfifo(run / fifo)
    a = ckpt["args"]
    resume = ["--learner", a["learner"], "--data", a["data"], "--root", a["root"], "--shots", str(a["shots"]), "--clip",
              a["clip"], "--epochs", str(a["epochs"]), "--workers", "0", "--resume", "--output-dir", str(run)]
    commands = [("evaluate.py", str(run), "--workers", "0", "--out", str(tmp_path / "ev"))] \
        if fifo in ("checkpoint.pt", "results.json") else []
    commands += [("train_backbone.py", *resume)] if fifo != "results.json" else []
    for cmd in commands:
        result = run_script(tmp_path, *cmd, timeout=60)
        assert f"{run / fifo} is not a regular file" in one_error(result)


# ------------------------------------------------------------------------------------------------
# --resume continues a run only with the flags it was started with
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unfinished(world, tmp_path_factory):
    """An unfinished stage-1 run and an unfinished DPC run (epoch 1 of 1 saved, not yet evaluated), and
    the flags each was started with."""
    base = tmp_path_factory.mktemp("unfinished")
    backbone = ["--learner", "coop", "--data", "synthetic", "--root", world["root"], "--clip", "tiny", "--epochs", "1",
                "--shots", "2", "--workers", "0", "--feature-cache", "off"]
    dpc = ["--backbone", world["finished"], "--epochs", "1", "--shots", "2", "--workers", "0", "--feature-cache", "off"]
    runs = {}
    for name, module, flags in (("backbone", tb, backbone), ("dpc", train_dpc, dpc)):
        folder = str(base / name)
        module.main(module.get_args(flags + ["--output-dir", folder]))
        path = os.path.join(folder, "checkpoint.pt")
        torch.save(dict(torch.load(path, weights_only=True), finished=False), path)
        os.remove(os.path.join(folder, "results.json"))
        runs[name] = (folder, module, flags)
    return runs


def copy_run(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return str(dst)


# (stage, flag, value): each changes what the run computes (stored value -> given value in the error).
CHANGED = [("backbone", "--seed", "2"), ("backbone", "--shots", "4"), ("backbone", "--lr", "0.01"),
           ("backbone", "--epochs", "2"), ("backbone", "--batch-size", "8"), ("backbone", "--n-ctx", "8"),
           ("backbone", "--ctx-init", ""), ("backbone", "--learner", "maple"), ("backbone", "--clip", "toy"),
           ("backbone", "--subsample", "all"), ("backbone", "--gpa-mean", "3"), ("backbone", "--data", "toy"),
           ("backbone", "--select-best-on-base-test", None), ("backbone", "--root", "elsewhere"),
           ("dpc", "--omega-b", "1"), ("dpc", "--omega-n", "0.5"), ("dpc", "--topk", "2"), ("dpc", "--lr", "0.01"),
           ("dpc", "--epochs", "3"), ("dpc", "--batch-size", "2"), ("dpc", "--seed", "7"), ("dpc", "--shots", "1"),
           ("dpc", "--loss", "learner"), ("dpc", "--negative-pool", "full"), ("dpc", "--base-inference", "mixed"),
           ("dpc", "--parallel-step", "paper"), ("dpc", "--min-negatives", "0")]


@pytest.mark.slow
@pytest.mark.parametrize("stage, flag, value", CHANGED, ids=[f"{s} {f}" for s, f, _ in CHANGED])
def test_resume_refuses_a_flag_that_changes_what_is_computed(unfinished, tmp_path, capsys, stage, flag, value):
    folder, module, flags = unfinished[stage]
    run = copy_run(folder, tmp_path / "run")
    given = flags + [flag] + ([value] if value is not None else [])
    with no_hang(), pytest.raises(SystemExit) as exit_:
        module.run(given + ["--output-dir", run, "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    stored = json.load(open(os.path.join(folder, "args.json")))[flag[2:].replace("-", "_")]
    assert f"was started with other flags: {flag} {stored!r} -> " in err[0], err[0]
    assert sorted(os.listdir(run)) == sorted(os.listdir(folder))          # nothing written, nothing removed
    assert open(os.path.join(run, "args.json")).read() == open(os.path.join(folder, "args.json")).read()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["backbone", "dpc"])
def test_resume_accepts_the_flags_that_change_only_how_it_runs(unfinished, tmp_path, capsys, stage):
    """--workers, --print-every, --device, --feature-cache (and --trust-checkpoint) may differ."""
    folder, module, flags = unfinished[stage]
    run = copy_run(folder, tmp_path / "run")
    module.run(flags + ["--workers", "1", "--print-every", "3", "--device", "cpu", "--feature-cache",
                        str(tmp_path / "cache"), "--trust-checkpoint", "--output-dir", run, "--resume"])
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert checkpoints.read_checkpoint(os.path.join(run, "checkpoint.pt"))["finished"]
    assert json.load(open(os.path.join(run, "args.json")))["workers"] == 1


# ------------------------------------------------------------------------------------------------
# SIGTERM in every entry point (they all end in command_line.run_cli)
# ------------------------------------------------------------------------------------------------

def test_every_entry_point_ends_in_run_cli():
    for name in ("train_backbone.py", "train_dpc.py", "evaluate.py", "tools/reproduce.py"):
        text = open(os.path.join(REPO, name)).read()
        assert "command_line.run_cli(" in text.split('if __name__ == "__main__":')[0] + text.rsplit("\n\n\n", 1)[-1], name


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_in_one_line_once_and_handlers_are_restored(capsys, signum):
    """A second signal while the run winds down (Slurm signals every process, the driver forwards its
    own) is ignored: one line, exit 128 + signal; the caller's handlers are back afterwards."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def main(args):
        os.kill(os.getpid(), signum)
        time.sleep(5)

    def winding_down(args):
        try:
            main(args)
        finally:
            os.kill(os.getpid(), signum)   # the second signal arrives during the cleanup
            time.sleep(0.2)

    with pytest.raises(SystemExit) as exit_:
        command_line.run_cli(winding_down, lambda argv: None)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 128 + signum and len(err) == 1
    assert err[0].startswith(f"interrupted ({signal.Signals(signum).name}):")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ------------------------------------------------------------------------------------------------
# tools/reproduce.py: drivers sharing an --out, Slurm array tasks
# ------------------------------------------------------------------------------------------------

def driver_argv(world, out, epochs=3):
    """One chain (CoOp, seed 1) whose stage 1 runs ~0.7 s an epoch: long enough to be signalled while it
    trains (3 epochs), or to outlast the start of a second driver (4 to 6; a forked driver starts at once)."""
    return ["--datasets", "synthetic", "--root", world["root"], "--learners", "coop", "--seeds", "1", "--clip", "tiny",
            "--out", str(out), "--workers", "0",
            "--backbone-flags", f"--epochs {epochs} --shots 8 --batch-size 1 --feature-cache off --print-every 1000",
            "--dpc-flags", "--epochs 1 --shots 2 --feature-cache off"]


def said(stdout: str) -> list[str]:
    """The driver's status lines about runs and chains ('run: <folder>', 'skip (finished): <folder>', ...),
    without the seconds a run took. A wait for the table another driver writes is not about a run: left out."""
    return [re.sub(r" \(\d+ s\)$", "", line) for line in stdout.splitlines()
            if line.split(":")[0] in ("run", "resume", "skip (finished)", "done", "busy", "waiting")
            and not line.startswith("waiting: the table")]


def starts(run_dir) -> int:
    """How many processes started (or resumed) training in a run folder, from its log.txt."""
    return sum(line.startswith(("train_backbone.py {", "train_dpc.py {")) for line in open(os.path.join(run_dir, "log.txt")))


@pytest.mark.slow
def test_slurm_task_requeued_after_sigterm_continues_and_resubmitted_does_nothing(world, tmp_path):
    """The written array script, run as bash with SLURM_ARRAY_TASK_ID as Slurm would: SIGTERM (preemption,
    time limit) reaches the driver through `exec`, which forwards it to its run and waits for it (no orphan);
    the requeued task resumes that run and trains the rest; a resubmitted task finds all finished. Those two run
    the command the script exec's (its runs forked too: tests/forked.py); the first one runs it all for real."""
    out, job = tmp_path / "runs", tmp_path / "job.sbatch"
    command_line.run_cli(reproduce.main, reproduce.get_args, driver_argv(world, out) + ["--slurm", str(job)])
    bin_dir = tmp_path / "bin"                        # `python` on the node: this interpreter
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    env = dict(ENV, SLURM_ARRAY_TASK_ID="0", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    stage1, dpc = out / "synthetic" / "coop" / "seed1", out / "synthetic" / "coop_dpc" / "seed1"

    task = subprocess.Popen(["bash", str(job)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(stage1 / "checkpoint.pt", task)
    child = holder_pid(stage1)
    task.send_signal(signal.SIGTERM)                  # to the batch shell, i.e. `#SBATCH --signal=B:TERM`
    first, err = task.communicate(timeout=60)
    assert task.returncode == 143 and err.strip().splitlines()[-1].startswith("interrupted (SIGTERM):"), err
    assert not alive(child), "the driver left its run training"
    assert "interrupted (SIGTERM)" in (stage1 / "stdout.txt").read_text()
    assert not checkpoints.read_checkpoint(str(stage1 / "checkpoint.pt"))["finished"] and not dpc.exists()

    exec_line = re.search(r'^exec (.*) --task "\$SLURM_ARRAY_TASK_ID"$', job.read_text(), re.M).group(1)
    python, driver, *flags = shlex.split(exec_line)
    assert python == "python" and driver == os.path.join(REPO, "tools", "reproduce.py")
    requeued = run_script(tmp_path, driver, *flags, "--task", "0", runs_forked=True)
    assert requeued.returncode == 0, requeued.stderr
    assert said(requeued.stdout) == [f"resume: {stage1}", f"done: {stage1}", f"run: {dpc}", f"done: {dpc}"]
    assert "resuming after epoch" in (stage1 / "log.txt").read_text()
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (stage1 / "checkpoint.pt", dpc / "checkpoint.pt")}

    resubmitted = run_script(tmp_path, driver, *flags, "--task", "0", runs_forked=True)
    assert resubmitted.returncode == 0, resubmitted.stderr
    assert said(resubmitted.stdout) == [f"skip (finished): {stage1}", f"skip (finished): {dpc}"]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == kept


@pytest.mark.slow
def test_two_drivers_on_one_out_run_each_run_once(world, tmp_path):
    """A second driver (another terminal, a resubmitted job) leaves the chain the first one runs until it
    is done, then finds it finished: every run is trained by one process, once."""
    out = tmp_path / "runs"
    stage1, dpc = out / "synthetic" / "coop" / "seed1", out / "synthetic" / "coop_dpc" / "seed1"
    first = start(tmp_path, "tools/reproduce.py", *driver_argv(world, out, epochs=4), runs_forked=True)
    wait_for(stage1 / "log.txt", first)
    second = run_script(tmp_path, "tools/reproduce.py", *driver_argv(world, out, epochs=4), runs_forked=True)
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (first_err, second.stderr)
    assert said(first_out) == [f"run: {stage1}", f"done: {stage1}", f"run: {dpc}", f"done: {dpc}"]
    lines = said(second.stdout)
    assert lines[0].startswith(f"busy: {stage1} (its chain is run by pid {first.pid} on ")
    assert lines[1].startswith(f"waiting: the chain of {stage1} is run by pid {first.pid} on ")
    assert lines[2:] == [f"skip (finished): {stage1}", f"skip (finished): {dpc}"]
    assert starts(stage1) == 1 and starts(dpc) == 1
    table = [line for line in second.stdout.splitlines() if line.startswith("waiting: the table")]
    assert all(f"the table is being written by pid {first.pid} on " in line for line in table)   # one after the other
    assert not [f for f in os.listdir(out) if f.endswith(".lock")]


@pytest.mark.slow
def test_a_driver_waits_for_a_run_its_killed_predecessor_left_training(world, tmp_path):
    """kill -9 of a driver leaves its run training (nothing can forward a SIGKILL); the next driver waits
    until that run is done instead of starting a second writer, then goes on with the chain."""
    out = tmp_path / "runs"
    stage1, dpc = out / "synthetic" / "coop" / "seed1", out / "synthetic" / "coop_dpc" / "seed1"
    first = start(tmp_path, "tools/reproduce.py", *driver_argv(world, out, epochs=6), runs_forked=True)
    wait_for(stage1 / "log.txt", first)
    orphan = holder_pid(stage1)
    second = start(tmp_path, "tools/reproduce.py", *driver_argv(world, out, epochs=6), runs_forked=True)
    busy = second.stdout.readline() + second.stdout.readline()   # the plan line, then "busy: ..." (the first runs)
    assert f"busy: {stage1} (its chain is run by pid {first.pid} on " in busy, busy
    first.kill()                                                 # its chain lock goes with it; its run trains on
    first.wait()
    assert alive(orphan)
    rest, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    lines = said(rest)
    assert lines[0].startswith(f"waiting: the chain of {stage1} is run by pid {first.pid} on ") or \
        lines[0].startswith(f"waiting: {stage1} is being written"), rest   # killed before or after it looked
    lines = lines[1:] if lines[0].startswith("waiting: the chain") else lines
    assert lines[0].startswith(f"waiting: {stage1} is being written by pid {orphan} on "), rest
    assert lines[1:] == [f"skip (finished): {stage1}", f"run: {dpc}", f"done: {dpc}"]
    assert starts(stage1) == 1 and starts(dpc) == 1


def test_a_file_system_without_locks_stops_the_run_in_one_line(world, tmp_path, capsys, monkeypatch):
    """flock fails with ENOLCK on a file system without locks: one line, never a run without its lock."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    err = fails_in_one_line(capsys, tb.run, ["--learner", "coop", "--data", "synthetic", "--root", world["root"],
                                             "--clip", "tiny", "--output-dir", str(tmp_path / "run")])
    assert f"cannot lock the run folder {tmp_path / 'run'} (No locks available)" in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def every_learner(tmp_path_factory):
    """A run of each learner and a DPC run on each, started with relative paths (--root, --teacher,
    --backbone) as users type them; returns (cwd, [(module, argv)])."""
    cwd = tmp_path_factory.mktemp("every_learner")
    # 4 train and 2 test images a class (the default: 20 and 4): enough for 2 shots; the flag check this
    # is about does not read the data, and each of the 17 runs evaluates on a fifth of the images
    toy_world.make_synthetic_imagefolder(str(cwd / "data"), "synthetic", n_train=4, n_val=0, n_test=2)
    common = ["--data", "synthetic", "--root", "data", "--clip", "tiny", "--epochs", "1", "--shots", "2", "--workers",
              "0", "--feature-cache", "off"]
    runs = [(tb, common + ["--learner", "promptsrc", "--output-dir", "teacher"])]
    for learner in ("coop", "maple", "promptsrc", "promptkd"):
        runs.append((tb, common + ["--learner", learner, "--output-dir", learner]
                     + (["--teacher", "teacher", "--batch-size", "4"] if learner == "promptkd" else [])))
        runs.append((train_dpc, ["--backbone", learner, "--epochs", "1", "--shots", "2", "--workers", "0",
                                 "--feature-cache", "off", "--output-dir", f"{learner}_dpc"]))
    with contextlib.chdir(cwd):
        for module, argv in runs:
            module.main(module.get_args(argv))
    return cwd, runs[1:]


@pytest.mark.slow
def test_resume_with_the_same_flags_continues_every_learner_and_its_dpc_run(every_learner, capsys):
    """The flag check never refuses the command a run was started with: defaults filled in per learner
    (lr, epochs, ω_b of MaPLe, PromptKD's kd-weight), relative paths recorded absolute."""
    cwd, runs = every_learner
    with contextlib.chdir(cwd):
        for module, argv in runs:
            folder = argv[argv.index("--output-dir") + 1]
            path = os.path.join(folder, "checkpoint.pt")
            torch.save(dict(torch.load(path, weights_only=True), finished=False), path)
            module.run(argv + ["--resume"])
            assert "resuming after epoch 1" in capsys.readouterr().out, folder
            assert checkpoints.read_checkpoint(path)["finished"], folder
