"""tests/forked.py: a forked child ends, prints and holds files as a fresh `python` would. Each case runs
the same program both ways and compares exit code, stdout and stderr (programs that import nothing
heavy: their real interpreter starts in a fraction of a second), plus one script of the project."""
import os
import signal
import subprocess
import sys

import pytest

import forked
import run_folder

PROGRAMS = {   # name: source, run by `python -c` and, as a function, in a fork
    "returns": "print('out'); print('err', file=sys.stderr)",
    "exit 3": "print('partial', end=''); sys.exit(3)",
    "exit with a message": "sys.exit('boom: one line')",
    "exit None": "sys.exit(None)",
    "raises": "print('before'); raise ValueError('bad value')",
    "Ctrl-C": "print('before'); raise KeyboardInterrupt",
    "SIGTERM": "print('before', flush=True); os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)",
    "not UTF-8": "sys.stdout.write('caf\\udce9\\n')",
}
PRELUDE = "import os, signal, sys, time\n"


def compared(out: bytes, err: bytes) -> tuple[bytes, bytes]:
    """Tracebacks name their file ('<string>' for -c, this file for the fork): only their last line counts."""
    lines = err.strip().splitlines()
    return out, lines[-1] if lines and lines[0].startswith(b"Traceback") else b"\n".join(lines)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_a_fork_ends_and_prints_as_a_fresh_interpreter(name):
    source = PRELUDE + PROGRAMS[name]
    real = subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=60)
    proc = forked.start_call(lambda: exec(source, {"__name__": "__main__"}))
    out, err = (f.buffer.read() for f in (proc.stdout, proc.stderr))   # bytes, as written
    proc.wait(60)
    assert proc.returncode == real.returncode, (name, real.stderr, err)
    assert compared(out, err) == compared(real.stdout, real.stderr), name


@pytest.mark.slow
def test_a_forked_script_is_the_script_run_by_python(tmp_path):
    """The script's own `__main__` block runs: the same one-line error and exit code as `python SCRIPT`."""
    argv = ["--backbone", str(tmp_path / "nothing"), "--topk", "1"]
    real = subprocess.run([sys.executable, os.path.join(forked.REPO, "train_dpc.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    fork = forked.run(tmp_path, "train_dpc.py", *argv)
    assert real.returncode == fork.returncode == 2 and real.stderr.startswith("error: --topk must be at least 2")
    assert (fork.stdout, fork.stderr) == (real.stdout, real.stderr)


def test_a_fork_holds_none_of_the_parents_locks_or_files(tmp_path):
    """The parent holds a run folder (as after an in-process run); the child is another process: refused by
    that lock, and it never releases it (its fds are closed, as Popen's close_fds)."""
    run_folder.lock_run_folder(str(tmp_path / "run"))
    try:
        proc = forked.start_call(lambda: run_folder.lock_run_folder(str(tmp_path / "run")))
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "is being written by another process" in err, err
        assert run_folder.is_locked(str(tmp_path / "run" / run_folder.LOCK_FILE))   # still ours
    finally:
        run_folder.release_run_folder()
    assert not run_folder.is_locked(str(tmp_path / "run" / run_folder.LOCK_FILE))


def test_signals_reach_a_fork_in_a_session_of_its_own():
    proc = forked.start_call(lambda: signal.pause(), new_session=True)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
