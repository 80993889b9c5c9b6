"""Run folders: one writer at a time, a log, files written atomically, progress lines.

What every stage needs to write a run that survives clusters (docs/clusters.md):
  - one writer per run folder (lock_run_folder: an flock that the OS lets go when the process dies);
  - args.json and log.txt (start_run, log), room on the disk checked first (check_disk);
  - atomic writes (save_atomic, write_json_atomic): a killed process never leaves half a file, and
    its temp files are recognised and removed later (temp_name, remove_stale_temps);
  - an epoch's progress lines and the NaN/inf stop (Progress, check_diverged);
  - RunError, the one-line error of a bad flag, run folder or checkpoint (command_line.run_cli prints it).
It imports no other module of the project but precision.py.
"""

import contextlib
import errno
import fcntl
import glob
import json
import os
import platform
import re
import shutil
import socket
import sys
import time

import torch

import precision


class RunError(ValueError):
    """A bad flag, run folder or checkpoint: one line saying what is wrong and how to fix it."""


# ------------------------------------------------------------------------------------------------
# Starting a run: room on the disk, args.json, log.txt
# ------------------------------------------------------------------------------------------------

def check_disk(folder: str, tensors) -> None:
    """Before the run folder is made: room for a checkpoint (state + optimiser + the temp copy of an
    atomic write) on the disk `folder` will be on."""
    need = 3 * sum(t.numel() * t.element_size() for t in tensors) + (1 << 20)
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)       # the nearest folder that exists (a file's parent, too)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise RunError(f"only {free >> 20} MB free in {folder}, checkpoints need about {need >> 20} MB: "
                       f"free some space or choose another --output-dir")


def start_run(args):
    """Create args.json, tee log() to log.txt (after every input was checked, the folder locked), and
    remove the temp files of atomic writes that a killed process left (no other writer can own them)."""
    for name in ("args.json", "log.txt"):
        check_regular(os.path.join(args.output_dir, name))
    try:
        for tmp in glob.glob(os.path.join(glob.escape(args.output_dir), "*.tmp")):
            if TEMP_NAME.fullmatch(os.path.basename(tmp)):
                os.remove(tmp)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    except OSError as e:
        raise RunError(f"cannot write to {args.output_dir}: {e.strerror}; choose a writable --output-dir")
    global _LOG
    if _LOG is not None:  # a previous run in this process (tests, evaluate.py)
        _LOG.close()
    _LOG = open(os.path.join(args.output_dir, "log.txt"), "a")
    log(f"{os.path.basename(sys.argv[0])} {json.dumps(vars(args))}\npython {platform.python_version()}, "
        f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name(torch.device(args.device))}, {precision.compute_dtype(args.device)})"
           if args.device.startswith("cuda") else ""))


def check_regular(path: str) -> None:
    """A FIFO, socket or device where a file of a run is expected would block a read or write forever."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise RunError(f"{path} is not a regular file (a FIFO, socket, device or dangling link): remove it, or "
                       f"choose another folder")


# ------------------------------------------------------------------------------------------------
# One writer per run folder (docs/clusters.md)
# ------------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"   # inside the run folder while a process writes it; says who (pid, host, since when)


def hold_lock(path: str) -> int | None:
    """An exclusive flock on `path` (created if missing) and the fd that holds it, or None if another
    process holds it. The OS releases a flock when its process ends, however it ends (kill -9, a lost
    node): a lock is never stale. On NFS, Linux maps flock to the server's byte-range locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if isinstance(e, BlockingIOError):
                return None
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)   # its holder removed the file as it let go (release_lock): lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd


def release_lock(path: str, fd: int) -> None:
    """Remove the lock file while still holding it, then let go: a process that opened the old file
    meanwhile sees it is gone (hold_lock) and locks a new one."""
    try:
        os.remove(path)
    except OSError:
        pass
    os.close(fd)


def lock_holder(path: str) -> str:
    """Who holds the lock file `path`, as it says ('pid N on HOST since ...')."""
    try:
        with open(path, errors="replace") as f:
            return f.read().strip() or "a process that is starting"
    except OSError:
        return "another process"


def is_locked(path: str) -> bool:
    """Whether another process holds the lock file `path` (tools/reproduce.py waits for such a run)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


_RUN_LOCK = None   # (folder, fd, whether this process created the folder) of the run folder it writes


def lock_run_folder(folder: str, flag: str = "--output-dir") -> None:
    """Take the run folder for this process, first thing, before its state is read: a second process on
    the same folder (a copy-paste slip, a resubmitted job) gets one error naming the holder, and writes
    nothing. Held until the process ends or run_cli returns; a folder this process created is removed
    again if the run ends before writing anything into it (an input error)."""
    global _RUN_LOCK
    release_run_folder()   # a process writes one run folder at a time (tests, evaluate.py run several)
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the run folder {folder} ({e.strerror}): choose a writable {flag}") from None
    try:
        fd = hold_lock(os.path.join(folder, LOCK_FILE))
    except OSError as e:   # read-only, or a file system without locks (ENOLCK): never run unprotected
        remove_if_empty(folder if created else None, os.path.join(folder, LOCK_FILE))
        raise RunError(f"cannot lock the run folder {folder} ({e.strerror}): choose an {flag} on a writable file "
                       f"system with file locks") from None
    if fd is None:
        raise RunError(f"{folder} is being written by another process ({lock_holder(os.path.join(folder, LOCK_FILE))}):"
                       f" wait until it ends, or choose another {flag}")
    _RUN_LOCK = (folder, fd, created)


def release_run_folder() -> None:
    """Let go of this process's run folder; remove it if this process created it and left it empty."""
    global _RUN_LOCK
    if _RUN_LOCK is not None:
        folder, fd, created = _RUN_LOCK
        _RUN_LOCK = None
        release_lock(os.path.join(folder, LOCK_FILE), fd)
        remove_if_empty(folder if created else None)


def remove_if_empty(folder: str | None, *files: str) -> None:
    """Remove `files`, then `folder` if nothing else is in it (an input error wrote nothing there)."""
    for path in files:
        with contextlib.suppress(OSError):
            os.remove(path)
    if folder:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


# ------------------------------------------------------------------------------------------------
# log.txt and files written atomically
# ------------------------------------------------------------------------------------------------

_LOG = None


def log(message: str):
    # A file name that is not UTF-8 is a surrogate-escaped str, which no terminal or log.txt encoding takes:
    # what a stream cannot encode is backslash-escaped (\udce9), so a line naming such a file never crashes.
    for stream in (sys.stdout, _LOG):
        if stream is not None:
            encoding = getattr(stream, "encoding", None) or "utf-8"
            stream.write(message.encode(encoding, "backslashreplace").decode(encoding) + "\n")
            stream.flush()


def temp_name(path: str) -> str:
    """A temp file beside `path` that no other writer picks: host, process and a random part (two hosts
    writing one feature cache on NFS can share a pid); TEMP_NAME recognises it."""
    return f"{path}.{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


TEMP_NAME = re.compile(r".+\.[A-Za-z0-9-]*\.\d+\.[0-9a-f]{8}\.tmp|.+\.\d+\.tmp")   # temp_name's, or an older pid-only one


def save_atomic(obj, path: str):
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint. The temp
    name is the writer's own (temp_name), so runs writing the same file (a shared feature cache) never mix."""
    tmp = temp_name(path)
    try:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:   # torch's zip writer reports a failed open or write (read-only, disk full) so
            reason = str(e).strip().rsplit(": ", 1)[-1]   # "... open file failed with strerror: Read-only file system"
            folder = os.path.dirname(os.path.abspath(path))
            free = shutil.disk_usage(folder).free
            if free < 2 ** 26:   # a short write ("unexpected pos ...") on a (nearly) full disk: say so
                reason = f"no space left on device: {free / 1e6:.1f} MB free in {folder}"
            raise OSError(errno.EIO, f"cannot write ({reason})", path) from e
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(folder: str, older_than_s: float = 86400) -> None:
    """Temp files of writes a killed process left (kill -9, a lost node) in a shared folder (the feature
    cache), once they are a day old: no live writer takes that long for one file."""
    now = time.time()
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        try:
            if TEMP_NAME.fullmatch(name) and now - os.stat(full).st_mtime > older_than_s:
                os.remove(full)
        except OSError:   # another process removed it first
            pass


def write_json_atomic(obj, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# An epoch's progress lines, and the stop at a NaN/inf loss or prompt
# ------------------------------------------------------------------------------------------------

class Progress:
    """The progress lines of one training epoch: the stage's own numbers, then the share of time spent
    waiting for data and the time left. Call waited() when a batch arrives and done(it, report, loss) after
    its step; report(elapsed seconds) builds the stage's part, only for the lines that are printed.

    A NaN/inf loss stops the run naming its epoch and iteration, but without a GPU->CPU wait at every step:
    the first bad iteration is noted on the loss's device and read at the printed lines (which read the loss
    anyway) and at the epoch's last step, before the epoch's checkpoint is written. `fix`: what to change."""

    def __init__(self, epoch: int, epochs: int, steps: int, print_every: int, later_steps: int | None = None,
                 fix: str = "lower --lr"):
        self.epoch, self.epochs, self.steps, self.print_every = epoch, epochs, steps, print_every
        self.later_steps = steps if later_steps is None else later_steps   # steps of each epoch still to come
        self.start = self.last = time.time()
        self.wait = 0.0
        self.fix, self.first_bad, self.bad_loss = fix, None, None          # on the loss's device

    def waited(self) -> None:
        self.wait += time.time() - self.last

    def watch(self, it: int, loss) -> None:
        """Note iteration `it` if its loss is the epoch's first NaN/inf (no wait for the device)."""
        loss = loss.detach().float()
        new = ~torch.isfinite(loss) if self.first_bad is None else (self.first_bad == 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(new, it, 0 if self.first_bad is None else self.first_bad)
        self.bad_loss = torch.where(new, loss, loss if self.bad_loss is None else self.bad_loss)

    def done(self, it: int, report, loss=None) -> None:
        self.last = time.time()
        if loss is not None:
            self.watch(it, loss)
        if it % self.print_every == 0 or it == self.steps:
            if self.first_bad is not None and int(self.first_bad):
                raise RunError(f"loss is {self.bad_loss.item()} at epoch {self.epoch} iteration "
                               f"{int(self.first_bad)}: {self.fix}; " + kept_checkpoint(self.epoch))
            elapsed = self.last - self.start
            left = (self.epochs - self.epoch) * self.later_steps + self.steps - it
            log(f"epoch {self.epoch}/{self.epochs} it {it}/{self.steps} {report(elapsed)} "
                f"data-wait {100 * self.wait / elapsed:.0f}% eta {left * elapsed / it / 60:.1f} min")


def check_diverged(prompt: dict, epoch: int) -> None:
    """The trained tensors after an epoch: a step can turn them NaN/inf even when every loss before it
    was finite (the last step of a run); such an epoch is never saved, let alone as finished."""
    bad = next((n for n, t in prompt.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise RunError(f"{bad} holds NaN/inf after epoch {epoch} (the run diverged): lower --lr; "
                       + kept_checkpoint(epoch))


def kept_checkpoint(epoch: int) -> str:
    """What a run stopped in `epoch` leaves behind: the checkpoint of epoch - 1, if there is one."""
    if epoch > 1:
        return f"the last good checkpoint (epoch {epoch - 1}) is kept"
    return "no checkpoint was written (it failed in the first epoch)"
