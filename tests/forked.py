"""Real processes without the start-up: the scripts run in a fork of the test process.

`python train_backbone.py ...` spends ~7 s of CPU on a 2-core x86 CPU importing torch and torchvision
before its first line runs; the cluster and reliability tests start dozens of such processes. `start`
forks this test process instead, where everything is imported already, and runs the script in the child
as `python SCRIPT ARGV...` would: `runpy` executes the file as `__main__`, so its own
`if __name__ == "__main__":` block (command_line.run_cli) runs, in a process of its own with its own pid,
signals, file locks, exit code and stdout/stderr pipes. What the child skips is only the interpreter's start.

Where the start itself is the point (a fresh interpreter's imports or memory, the interpreter's own exit
on a closed pipe), tests keep `subprocess`. A child inherits the parent's modules as they are: start it
from a test that has nothing monkeypatched. `env` replaces the child's os.environ; settings a module reads
once at import (command_line.FEATURE_CACHE) keep the parent's values."""
import io
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Forked:
    """The parent's handle on a forked child: the part of subprocess.Popen's interface the tests use."""

    def __init__(self, pid: int, stdout, stderr):
        self.pid, self.stdout, self.stderr, self.returncode = pid, stdout, stderr, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)   # -N for signal N, as Popen
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def communicate(self, timeout=None):
        """Both pipes read to their end (in threads, so that neither fills up), then the exit status."""
        out = {}
        readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()), daemon=True)
                   for k, f in (("stdout", self.stdout), ("stderr", self.stderr))]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.time() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.time()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.time()))
        return out["stdout"], out["stderr"]

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def _exit_code(code) -> int:
    """What the interpreter makes of SystemExit(code): None is 0, an int itself, anything else printed, 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def fresh_project_state():
    """What a new interpreter starts without: the run folder this process writes (run_folder's lock and
    log.txt, held after an in-process run until the next one) and scoring's in-process feature memo."""
    import run_folder
    import scoring
    run_folder._RUN_LOCK = run_folder._LOG = None   # their fds are closed in the child, never released
    scoring._MEMO.clear()


def _child(target, cwd, env, new_session, out_w, err_w):
    """In the forked child: the fds, directory, environment and signal handlers of a fresh `python`, then
    `target()`; never returns into the parent's code (os._exit)."""
    code = 1
    try:
        if new_session:
            os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))   # as Popen's close_fds: no lock or pipe of the parent's stays open
        signal.alarm(0)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)   # as Python sets it at start
        # a pipe's stdout is block-buffered and stderr line-buffered, with the encoding and error handlers
        # this interpreter chose for its own streams at start (the locale's), as in a fresh interpreter
        stdout, stderr = sys.__stdout__, sys.__stderr__
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding=stdout.encoding,
                                      errors=stdout.errors)
        sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding=stderr.encoding,
                                      errors=stderr.errors, line_buffering=True)
        fresh_project_state()
        os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        try:
            target()
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
        except KeyboardInterrupt:   # the interpreter ends on an uncaught Ctrl-C by dying of SIGINT
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            traceback.print_exc()
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
    finally:
        os._exit(code)


def _session(pid: int):
    """The session id of `pid`, or `pid` itself once it has ended (nothing left to wait for)."""
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return pid


def _fork(target, cwd: str, env, new_session: bool, out_fd: int, err_fd: int) -> int:
    """Fork a child that runs `target()` with out_fd and err_fd as its stdout and stderr (_child); the parent
    lets go of its copies of the two fds and gets the child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(target, cwd, env, new_session, out_fd, err_fd)
    os.close(out_fd)
    os.close(err_fd)
    return pid


def _run_script(path: str, argv) -> None:
    """What `python PATH ARGV...` runs: the file as `__main__`, its own folder first on sys.path."""
    sys.argv = [path, *map(str, argv)]
    sys.path.insert(0, os.path.dirname(path))
    runpy.run_path(path, run_name="__main__")


def start_call(target, cwd=".", env=None, new_session=False) -> Forked:
    """`target()` in a forked child, as a process of its own; its stdout/stderr are text pipes."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = _fork(target, str(cwd), env, new_session, out_w, err_w)   # the child closes the read ends (close_fds)
    while new_session and _session(pid) != pid:   # as Popen(start_new_session=True): its group exists on return
        time.sleep(0.001)
    return Forked(pid, open(out_r, encoding="utf-8", errors="backslashreplace"),
                  open(err_r, encoding="utf-8", errors="backslashreplace"))


def start(cwd, name, *argv, env=None, new_session=False, runs_forked=False) -> Forked:
    """`python REPO/name argv...` started in `cwd`, in a fork: the script runs as `__main__`. runs_forked (for
    tools/reproduce.py): the `python SCRIPT ...` runs the driver starts are forks of it too (popen_forked)."""
    def main():
        if runs_forked:
            subprocess.Popen = popen_forked   # in the child only
        _run_script(os.path.join(REPO, name), argv)
    return start_call(main, cwd, env, new_session)


def popen_forked(cmd, stdout=None, stderr=None, env=None):
    """subprocess.Popen(cmd, stdout=a file or None, stderr=STDOUT or None, env=...) for cmd = [sys.executable,
    SCRIPT, argv...], as tools/reproduce.py starts its runs: SCRIPT runs in a fork, in the caller's folder,
    with the caller's stdout (or the file) as its stdout, and stderr with it or the caller's."""
    script, argv = cmd[1], cmd[2:]
    assert cmd[0] == sys.executable and script.endswith(".py"), cmd
    out = os.dup(stdout.fileno() if stdout is not None else 1)
    err = os.dup(out if stderr == subprocess.STDOUT else 2)
    if stdout is not None:
        stdout.flush()
    return Forked(_fork(lambda: _run_script(script, argv), os.getcwd(), env, False, out, err), None, None)


def run(cwd, name, *argv, env=None, timeout=300, runs_forked=False) -> subprocess.CompletedProcess:
    """start(...) to its end: a CompletedProcess as subprocess.run(..., capture_output=True, text=True) gives."""
    proc = start(cwd, name, *argv, env=env, runs_forked=runs_forked)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess([name, *argv], proc.returncode, out, err)
