"""Run folders and checkpoints: the plumbing every stage shares, one floor below the stages.

train_backbone.py, train_dpc.py and evaluate.py show their stage; what they all need to run safely
for days lives here, so that none of them has to show it:
  - the command line: flags every script shares and their checks, one `error:` line per bad input
    (run_cli), Ctrl-C or SIGTERM that keeps the last finished epoch;
  - a run folder: one writer at a time (lock_run_folder), args.json, log.txt (log), atomic writes, the
    checks before anything is written, --resume only with the flags the run was started with;
  - checkpoints read as plain data, never running code from the file (README "Loading checkpoints
    safely"), with their schema and finite values checked where they are read;
  - CLIP weights, and finished stage-1 runs: ours (checkpoint.pt) or the original code's Dassl
    folders (README Differences 11), PromptKD's teacher and DePT's head included;
  - precision: autocast and the fp16 loss scaler both stages use.
This module never imports a stage file.
"""
import argparse
import contextlib
import errno
import fcntl
import glob
import io
import json
import os
import pickle
import platform
import re
import shutil
import signal
import socket
import sys
import threading
import time

import torch

import clip_model
import data
import prompts

LAST_BACKBONE = os.path.join("output", "last_backbone.txt")  # where train_dpc.py finds the latest run

# PromptKD's teacher as the original code trains it (PromptSRC config vit_l14_c2_ep20_batch8_4+4ctx,
# 16-shot base classes; README Differences 4): `train_backbone.py --learner promptsrc` with these flags.
PROMPTKD_TEACHER_RECIPE = dict(learner="promptsrc", clip="ViT-L/14", lr=0.005, batch_size=8, epochs=20, shots=16,
                               subsample="base")


class RunError(ValueError):
    """A bad flag, run folder or checkpoint: one line saying what is wrong and how to fix it."""


class Parser(argparse.ArgumentParser):
    """argparse whose bad-flag message is one line (no usage block), like every other input error."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------------------------------------
# Flags every script shares, checked before anything is written
# ------------------------------------------------------------------------------------------------

def add_run_flags(p):
    """Flags every training script shares: run-folder handling, data loading, device."""
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="start over even if --output-dir holds a run")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes (0 = in the main process); "
                   "train_dpc.py also renders its negatives on this many threads. On <= 2 cores use 0")
    p.add_argument("--print-every", type=int, default=20, help="iterations between progress lines")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_feature_cache_flag(p)
    add_trust_flag(p)


def add_trust_flag(p):
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle checkpoints fully: RUNS CODE FROM THE FILE; only for files you trust (by default "
                        "they are read as plain data, README 'Loading checkpoints safely')")


# Default folder of the on-disk feature cache (--feature-cache; "off" disables it). Safe to delete.
FEATURE_CACHE = os.environ.get("DPC_FEATURE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpc_features")


def add_feature_cache_flag(p):
    p.add_argument("--feature-cache", default=FEATURE_CACHE,
                   help="folder of cached test-image features of CLIP's plain image encoder (keyed by the CLIP "
                        "weights, transform and image files; safe to delete; env DPC_FEATURE_CACHE), or 'off'")


def check_shots(shots: int) -> None:
    if shots < 0:
        raise RunError(f"--shots must be 0 (all images) or positive, got {shots}")


def check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if not (value > 0 and value < torch.finfo(torch.float32).max):   # finite in fp32, where it is used
            raise RunError(f"--{name.replace('_', '-')} must be positive and finite (in fp32), got {value}")


def check_run_flags(args) -> None:
    """The flags every script reads, checked before anything is written."""
    if args.workers < 0:
        raise RunError(f"--workers must be 0 (load in the main process) or positive, got {args.workers}")
    if getattr(args, "print_every", 1) < 1:
        raise RunError(f"--print-every must be at least 1, got {args.print_every}")
    if getattr(args, "seed", None) is not None and not -2 ** 63 <= args.seed < 2 ** 63:
        raise RunError(f"--seed must fit in 64 bits, got {args.seed}")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", args.device)
    if args.device != "cpu" and not (cuda and int(cuda.group(1) or 0) < torch.cuda.device_count()):
        raise RunError(f"--device {args.device} is not available here: pass --device cpu" +
                       (" or cuda[:N]" if torch.cuda.is_available() else " (no CUDA GPU is visible)"))
    if cuda:   # GPU N becomes the current one: no tensor, kernel or context of this run lands on GPU 0
        torch.cuda.set_device(torch.device(args.device))
    if getattr(args, "feature_cache", None) == "":
        raise RunError("--feature-cache '' names no folder: give a folder, or 'off'")


def check_not_a_source(output_dir: str, **sources) -> None:
    """--output-dir must not be a run this one reads (--backbone, --teacher, --continue-from):
    writing there, even with --overwrite, would destroy the run it starts from."""
    for flag, folder in sources.items():
        if folder and os.path.realpath(folder) == os.path.realpath(output_dir):
            raise RunError(f"--output-dir {output_dir} is the --{flag.replace('_', '-')} run itself: writing there "
                           f"would destroy it; choose another --output-dir")


# ------------------------------------------------------------------------------------------------
# Run folder, logging, atomic writes
# ------------------------------------------------------------------------------------------------

def check_run_folder(args, kind: str = "backbone"):
    """Take the run folder (lock_run_folder: one writer), then, before anything is written, the
    unfinished checkpoint to resume from, or None. A finished run is never touched without --overwrite;
    --resume continues a run only with the flags it was started with (changed_flags)."""
    lock_run_folder(args.output_dir)   # before the folder's state is read: no second process reads it too
    path = os.path.join(args.output_dir, "checkpoint.pt")
    if not os.path.lexists(path) or args.overwrite:
        return None
    previous = read_checkpoint(path, args.trust_checkpoint)
    if previous["kind"] != kind:
        raise RunError(f"{args.output_dir} holds a {previous['kind']} run of {SCRIPT[previous['kind']]}, not a "
                       f"{kind} run: choose another --output-dir")
    if previous["finished"]:
        raise RunError(f"{args.output_dir} already holds a finished run: re-evaluate it with evaluate.py, "
                       f"or pass --overwrite to train again (or another --output-dir)")
    if not args.resume:   # None: a script without --resume (tools/import_dassl.py)
        fix = "--overwrite to replace it, or another --output-dir" if args.resume is None else \
            "--resume to continue or --overwrite to start over"
        raise RunError(f"{args.output_dir} holds an unfinished run (epoch {previous['epoch']}/"
                       f"{previous['args'].get('epochs')}): pass {fix}")
    changed = changed_flags(previous["args"], vars(args))
    if changed:
        raise RunError(f"--resume: {args.output_dir} was started with other flags: {', '.join(changed)}; resume with "
                       f"the run's own flags (its args.json), or train a new run with --overwrite or another --output-dir")
    return previous


# What --resume may change: how a run is executed, not what it computes (README "Clusters and shared machines").
HOW_FLAGS = ("resume", "overwrite", "output_dir", "workers", "print_every", "device", "feature_cache",
             "trust_checkpoint")


def changed_flags(stored: dict, given: dict) -> list[str]:
    """'--flag stored -> given' for every flag that changes what a run computes (all but HOW_FLAGS) and
    differs from the run's stored args. A flag the run did not record (an older version) is not compared."""
    return [f"--{k.replace('_', '-')} {stored[k]!r} -> {given[k]!r}" for k in given
            if k in stored and k not in HOW_FLAGS and stored[k] != given[k]]


# What differs between the seed runs of one experiment (a Tab. 1 row averages seeds of one experiment):
# the seed, where its data and its per-seed inputs lie, and how it ran. The CLIP is compared by content.
PER_SEED = HOW_FLAGS + ("seed", "root", "backbone", "teacher", "continue_from", "imported_from", "dassl_run", "clip")


def file_digest(path: str, _memo={}) -> str:
    """SHA-256 of a file's bytes (clip_model.file_sha256), once per (path, size, mtime) in this process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        _memo[key] = clip_model.file_sha256(path)
    return _memo[key]


def same_clip(a: str, b: str) -> bool:
    """Two runs' CLIP: the same name, or two files with the same bytes (a copy elsewhere, another mount)."""
    return a == b or (os.path.isfile(a) and os.path.isfile(b) and file_digest(a) == file_digest(b))


def setting_differences(a: dict, b: dict) -> list[str]:
    """'--flag x vs y' for every setting (a run's args, PER_SEED left out) in which two runs of one row differ;
    the CLIP weights by content."""
    out = [f"--{k.replace('_', '-')} {a[k]!r} vs {b[k]!r}" for k in sorted(set(a) & set(b))   # an older run's
           if k not in PER_SEED and a[k] != b[k]]                                                  # unknown flag: not compared
    if not same_clip(str(a.get("clip")), str(b.get("clip"))):
        out.append(f"--clip {a.get('clip')!r} vs {b.get('clip')!r} (other weights)")
    return out


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
        + (f" ({torch.cuda.get_device_name(torch.device(args.device))}, {compute_dtype(args.device)})"
           if args.device.startswith("cuda") else ""))


def check_regular(path: str) -> None:
    """A FIFO, socket or device where a file of a run is expected would block a read or write forever."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise RunError(f"{path} is not a regular file (a FIFO, socket, device or dangling link): remove it, or "
                       f"choose another folder")


# ------------------------------------------------------------------------------------------------
# One writer per run folder (README "Clusters and shared machines")
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


# ------------------------------------------------------------------------------------------------
# Precision (README Differences 1)
# ------------------------------------------------------------------------------------------------

def compute_dtype(device: str) -> torch.dtype:
    """What the towers compute in on `device` (README Differences 1 and 16): fp32 on the CPU; bf16 on GPUs
    with bf16 tensor cores (compute capability 8.0 on: A100, H100, RTX 30xx and later); fp16 on older ones
    (V100, T4). Decided on the capability of the GPU asked for, not on torch.cuda.is_bf16_supported(), which
    by default also says yes where bf16 is only emulated (slower than fp16 there)."""
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(torch.device(device)) >= (8, 0) else torch.float16


def autocast(device: str):
    """Autocast in compute_dtype(device) on a GPU; plain fp32 on the CPU."""
    if not device.startswith("cuda"):
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=compute_dtype(device))


def grad_scaler(device: str):
    """Loss scaling for fp16 autocast (GPUs without bf16 tensor cores: V100, T4), where small gradients
    underflow; a no-op for bf16 and fp32. Both stages use it, and checkpoint its state (README Differences 16)."""
    return torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu",
                                enabled=compute_dtype(device) == torch.float16)


def to_device(tensors, device: str):
    """A dict of tensors restored from a checkpoint (read on the CPU) on the run's device, or None as it is:
    what a resumed loop adds to its own tensors must sit where they do (PromptSRC's GPA sum)."""
    return None if tensors is None else {n: t.to(device) for n, t in tensors.items()}


# ------------------------------------------------------------------------------------------------
# Reading checkpoints without running code from them (README "Loading checkpoints safely")
# ------------------------------------------------------------------------------------------------

TRUST_HINT = "if you trust the file, pass --trust-checkpoint (it runs code from the file)"


class Inert:
    """Stands in for an object a Dassl checkpoint pickles but no stage ever needs: the optimiser and
    LR scheduler objects (Dassl's warm-up scheduler state pickles its successor scheduler, and with it
    the optimiser). Nothing of the file is ever called: creating one ignores its arguments, and the
    pickled state is kept as plain data."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.pickled_state = state


def _plain_dict(*args):
    """collections.defaultdict(dict) of an optimiser's state, read as a plain (empty) dict."""
    return {}


# Globals of a Dassl checkpoint that are read as Inert stand-ins: optimiser/scheduler classes (torch's
# and Dassl's own), the defaultdict of an optimiser state, and numpy scalars (val_result).
INERT_GLOBALS = ("torch.optim.", "dassl.", "collections.defaultdict", "builtins.dict", "numpy.dtype",
                 "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")


def load_safely(path: str, trust: bool = False, inert_objects: bool = False):
    """torch.load with weights_only=True: tensors, dicts, lists, numbers and strings only, so loading
    never runs code hidden in the file. `inert_objects` (Dassl checkpoints) also reads the globals of
    INERT_GLOBALS, as inert stand-ins that are never called. Any other global is refused naming it;
    only `trust` (--trust-checkpoint) unpickles it for real."""
    check_regular(path)
    problem = clip_model.zip_problem(path)   # before anything is inflated or allocated
    if problem:
        raise RunError(f"refusing to read {path}: {problem}; it is damaged or was not written by a training script")
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)  # runs code: the user said so
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)   # scans, never executes
    except Exception:  # a legacy (pre-1.6) or broken file: weights_only=True alone decides below
        unsafe = []
    refused = [g for g in unsafe if not (inert_objects and g.startswith(INERT_GLOBALS))]
    if refused:
        raise RunError(f"refusing to load {path}: it pickles {refused[0]}, which could run code; {TRUST_HINT}")
    stand_ins = [(_plain_dict if g == "collections.defaultdict" else Inert, g) for g in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a global the scan missed (legacy format), or an odd pickle
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise RunError(f"refusing to load {path}: it pickles {found.group(1)}, which could run code; "
                           f"{TRUST_HINT}") from None
        reason = re.search(r"WeightsUnpickler error: \s*(.*?)\s*\n", str(e) + "\n")
        raise RunError(f"cannot read checkpoint {path} ({reason.group(1) if reason else 'UnpicklingError'}): it is "
                       f"corrupted, truncated or not plain data; train that run again (--overwrite)") from None
    except Exception as e:
        raise RunError(f"cannot read checkpoint {path} ({type(e).__name__}): it is corrupted or truncated; "
                       f"train that run again (--overwrite)") from None


# What every checkpoint of ours holds, per kind (backbone_checkpoint, dpc_checkpoint above), with
# the types the stages rely on; RUN_ARGS: the entries of its args that are read back.
RUN_KEYS = {"backbone": ("learner", "clip", "data", "classnames", "state", "epoch", "finished", "args", "optimizer",
                         "gpa_sum", "best"),
            "dpc": ("learner", "clip", "data", "classnames", "backbone", "tuned_prompt", "parallel_prompt", "epoch",
                    "finished", "args", "optimizer")}

RUN_TYPES = {"learner": str, "clip": str, "data": str, "classnames": list, "state": dict, "epoch": int,
             "finished": bool, "args": dict, "optimizer": dict, "backbone": str, "tuned_prompt": dict,
             "parallel_prompt": dict, "gpa_sum": (dict, type(None)), "best": (tuple, list, type(None))}

RUN_ARGS = {"backbone": {"seed": int, "root": str, "shots": int},
            "dpc": {"seed": int, "root": str, "shots": int, "omega_b": (int, float), "omega_n": (int, float),
                    "base_inference": str}}

SCRIPT = {"backbone": "train_backbone.py", "dpc": "train_dpc.py"}


def backbone_checkpoint(args, learner, classnames, epoch, optimizer, gpa_sum, best, finished, scaler=None) -> dict:
    """What train_backbone.py saves, small and self-describing: the learner's own tensors, never the frozen
    CLIP. An epoch's checkpoint holds that epoch's prompts and the GPA sum so far (--resume continues from
    them); the finished one holds the reported prompts (GPA aggregate, or the selected epoch): the P of DPC."""
    return dict(kind="backbone", learner=args.learner, clip=args.clip, data=args.data, classnames=classnames,
                state=prompts.learner_state(learner), epoch=epoch, finished=finished, args=vars(args),
                optimizer=optimizer.state_dict(), gpa_sum=gpa_sum, best=best, scaler=scaler_state(scaler))


def dpc_checkpoint(args, backbone, classnames, tuned_prompt, parallel_prompt, epoch, optimizer, finished,
                   scaler=None) -> dict:
    """What train_dpc.py saves: P and the trained P' (the learner's tensors only), never the frozen CLIP."""
    return dict(kind="dpc", learner=args.learner, clip=backbone["clip"], data=args.data, classnames=classnames,
                backbone=os.path.abspath(args.backbone), epoch=epoch, finished=finished, args=vars(args),
                tuned_prompt={n: t.detach().cpu() for n, t in tuned_prompt.items()},
                parallel_prompt={n: t.detach().cpu() for n, t in parallel_prompt.items()},
                optimizer=optimizer.state_dict(), scaler=scaler_state(scaler))


def scaler_state(scaler) -> dict:
    """The GradScaler's state, plain numbers ({} when it is off: bf16 and fp32)."""
    return scaler.state_dict() if scaler is not None and scaler.is_enabled() else {}


def load_scaler_state(scaler, ckpt: dict) -> None:
    """--resume of an fp16 run: the loss scale and growth count it had (older checkpoints have none)."""
    state = ckpt.get("scaler") or {}
    if scaler.is_enabled() and isinstance(state, dict) and isinstance(state.get("scale"), float):
        try:
            scaler.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise RunError("the loss-scaler state of the checkpoint does not fit this run; train that run again "
                           "with --overwrite") from None


def schema_problem(ckpt: dict, kind: str) -> str | None:
    """What is missing or of the wrong type in a checkpoint of ours, or None."""
    missing = [k for k in RUN_KEYS[kind] if k not in ckpt]
    if missing:
        return f"missing {missing}"
    wrong = [k for k in RUN_KEYS[kind] if not isinstance(ckpt[k], RUN_TYPES[k])
             or (RUN_TYPES[k] is int and isinstance(ckpt[k], bool))]
    if wrong:
        return f"{wrong[0]} is a {type(ckpt[wrong[0]]).__name__}"
    if ckpt["learner"] not in prompts.LEARNERS:
        return f"unknown learner {ckpt['learner']!r}"
    if not all(isinstance(c, str) for c in ckpt["classnames"]):
        return "classnames are not all strings"
    for part in ("state",) if kind == "backbone" else ("tuned_prompt", "parallel_prompt"):
        if not all(isinstance(k, str) for k in ckpt[part]):
            return f"{part} has names that are not strings"
    best = ckpt.get("best")
    if best is not None and not (len(best) == 2 and isinstance(best[0], (int, float)) and isinstance(best[1], dict)):
        return "best is not (accuracy, state)"
    args = ckpt["args"]
    for name, types in RUN_ARGS[kind].items():
        if not isinstance(args.get(name), types) or isinstance(args.get(name), bool):
            return f"args[{name!r}] is {args.get(name)!r}"
    return None


def read_checkpoint(path: str, trust: bool = False) -> dict:
    """A run checkpoint of train_backbone.py / train_dpc.py, read safely and checked once, here: its
    schema (kind, learner, clip, data, state, finished, ...) and finite prompt values."""
    ckpt = load_safely(path, trust)
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind not in RUN_KEYS:
        raise RunError(f"{path} was not written by train_backbone.py or train_dpc.py (no kind 'backbone' or "
                       f"'dpc'): pass a run folder of this project, or a Dassl folder to train_dpc.py --backbone")
    if kind == "dpc" and "mixed_prompt" in ckpt and "parallel_prompt" not in ckpt:
        raise RunError(f"{path} was written by an earlier train_dpc.py, which stored the mixed prompt P̃_b and moved P' "
                       f"1/ω_b times farther per step than the released code (README Differences 6): train that run "
                       f"again with train_dpc.py --overwrite")
    problem = schema_problem(ckpt, kind)
    if problem:
        raise RunError(f"{path} is an incomplete or damaged {kind} checkpoint ({problem}): "
                       f"train that run again with {SCRIPT[kind]} --overwrite")
    parts = {"state": ckpt["state"], "gpa_sum": ckpt["gpa_sum"] or {}, "best": ckpt["best"][1] if ckpt["best"] else {}} \
        if kind == "backbone" else {part: ckpt[part] for part in ("tuned_prompt", "parallel_prompt")}
    tensors = {f"{part} {k}": v for part, values in parts.items() for k, v in values.items()}
    check_finite(tensors, path, f"train that run again with a lower --lr ({SCRIPT[kind]} --overwrite)")
    return ckpt


def load_optimizer_state(optimizer, state: dict, path: str) -> None:
    """Restore an optimiser state dict of a checkpoint (--resume, --continue-from); one error line,
    not a failure at the first step, when it does not fit this run's tensors."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise RunError(f"the optimiser state in {path} does not fit this run ({type(e).__name__}); "
                       f"train that run again with --overwrite") from None
    for group in optimizer.param_groups:
        for p in group["params"]:
            buffer = optimizer.state[p].get("momentum_buffer")
            if buffer is not None and (not isinstance(buffer, torch.Tensor) or buffer.shape != p.shape):
                raise RunError(f"the optimiser state in {path} does not fit this run (a momentum buffer of "
                               f"another shape); train that run again with --overwrite")


def check_finite(tensors: dict, path: str, fix: str) -> None:
    """A NaN/inf prompt gives chance accuracy or a diverging DPC run: refuse it where it is read."""
    for name, value in tensors.items():
        problem = clip_model.tensor_problem(value)   # a dense CPU tensor inside its storage
        if problem:
            raise RunError(f"{path}: {name} is {problem}: the file is damaged or was not written by a training "
                           f"script; train that run again")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise RunError(f"{path}: {name} holds NaN/inf values (the run diverged); {fix}")


# ------------------------------------------------------------------------------------------------
# CLIP and finished stage-1 runs, ours or the original code's (train_dpc.py, evaluate.py)
# ------------------------------------------------------------------------------------------------

TOY_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy_clip.pt")


def clip_path(name: str) -> str:
    """A --clip that names a weights file is recorded as an absolute path, so that the run can be
    evaluated (and DPC trained on it) from another folder; model names are kept as they are."""
    return os.path.abspath(name) if name not in ("tiny", "toy") and os.path.isfile(name) else name


def load_clip(name: str, device):
    """'tiny' is a fixed random CLIP (seed 0) so every stage of a smoke run sees the same weights;
    'toy' is the small CLIP pretrained on the toy world, shipped in assets/ (tools/pretrain_toy_clip.py)."""
    if name == "tiny":
        return clip_model.random_clip("tiny", seed=0).to(device)
    if name == "toy":
        if not os.path.isfile(TOY_CLIP):
            raise clip_model.CLIPLoadError(f"the toy CLIP {TOY_CLIP} is missing: restore it with `git checkout "
                                           f"-- assets/toy_clip.pt` or rebuild it with `python "
                                           f"tools/pretrain_toy_clip.py` (about 10 minutes on 2 CPU cores)")
        return clip_model.load(TOY_CLIP).to(device)
    return clip_model.load(name).to(device)


def load_backbone(run_dir: str, device, trust: bool = False):
    """The learner of a finished train_backbone.py run, its checkpoint dict and its CLIP."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise RunError(f"no backbone run in {run_dir} (checkpoint.pt missing): train one with train_backbone.py")
    ckpt = read_checkpoint(path, trust)
    a = ckpt["args"]
    if ckpt["kind"] == "dpc":
        raise RunError(f"{run_dir} holds a DPC run (train_dpc.py), not a stage-1 run: pass its backbone "
                       f"{ckpt['backbone']} instead")
    if not ckpt["finished"]:
        raise RunError(f"{run_dir} holds an unfinished backbone run (epoch {ckpt['epoch']}/{a.get('epochs')}): "
                       f"finish it with `train_backbone.py --learner {ckpt['learner']} --data {ckpt['data']} "
                       f"--output-dir {run_dir} --resume`")
    clip = load_clip(ckpt["clip"], device)
    teacher = None
    if ckpt["learner"] == "promptkd":
        teacher, _ = load_teacher(a["teacher"], a.get("teacher_clip") or "ViT-L/14", device, trust)
    learner = prompts.build_learner(ckpt["learner"], clip, teacher, a.get("n_ctx"), a.get("ctx_init"), a.get("kd_weight"),
                                    ckpt["classnames"] if a.get("dept") else None, a.get("dept_weight", prompts.DePT.WEIGHT))
    prompts.load_learner_state(learner, ckpt["state"])
    return learner.to(device).eval(), ckpt, clip


def remember_last_backbone(run_dir: str) -> None:
    """Record a finished stage-1 run as the one train_dpc.py continues without --backbone (find_backbone)."""
    os.makedirs(os.path.dirname(LAST_BACKBONE), exist_ok=True)
    tmp = temp_name(LAST_BACKBONE)   # runs in parallel (tools/reproduce.py) never mix
    with open(tmp, "w") as f:
        f.write(os.path.abspath(run_dir) + "\n")
    os.replace(tmp, LAST_BACKBONE)


def find_backbone(backbone: str | None) -> str:
    """train_dpc.py --backbone, or the run train_backbone.py wrote last (said aloud, so nobody is surprised)."""
    if backbone:
        return backbone
    if not os.path.isfile(LAST_BACKBONE):
        raise RunError(f"no --backbone given and no {LAST_BACKBONE}: run train_backbone.py first "
                       f"or pass --backbone RUN_DIR")
    with open(LAST_BACKBONE) as f:
        backbone = f.read().strip()
    print(f"using the last backbone run: {backbone}")
    return backbone


def load_stage1(run_dir: str, device, trust: bool = False, clip: str = None, teacher: str = None,
                teacher_clip: str = None):
    """The learner of a finished stage-1 run and its record {learner, clip, data, classnames, args}:
    a train_backbone.py run (checkpoint.pt), or a Dassl folder of the original code, which records no
    dataset, classes or seed (data None) and whose CLIP and PromptKD teacher the flags name (a DePT
    folder, whose head's classes it does not record either, stops with HeadClassesUnknown)."""
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        learner, ckpt, _ = load_backbone(run_dir, device, trust)
        return learner, ckpt
    learner, name = dassl_learner(run_dir, clip, device, teacher, teacher_clip, trust)
    return learner, dict(learner=name, clip=clip, data=None, args={})


def add_backbone_flags(p):
    """train_dpc.py's flags for its stage-1 run: ours record their own; a Dassl folder of the original code
    records none of them."""
    p.add_argument("--data", default=None, help="dataset (default: the backbone's; required for a Dassl folder)")
    p.add_argument("--root", default=None, help="dataset root (default: the backbone's; 'data' for a Dassl folder)")
    p.add_argument("--clip", default="ViT-B/16", help="CLIP of a Dassl backbone (ours record their own)")
    p.add_argument("--teacher", default=None, help="Dassl PromptKD backbone: its Dassl PromptSRC teacher folder")
    p.add_argument("--teacher-clip", default="ViT-L/14", help="CLIP of that Dassl teacher")


def dpc_backbone(args):
    """train_dpc.py's stage-1 run (--backbone, or the last one trained): its learner and its record. The
    dataset, root, seed and class split (base, or all classes for a Tab. 2 source) are the backbone's unless
    a flag names them; a Dassl folder records none of them, so --data must."""
    args.backbone = os.path.abspath(find_backbone(args.backbone))   # recorded as is: --resume compares it
    args.data = args.data and data.dataset_name(args.data)          # CoOp's config names too (imagenetv2)
    args.teacher = args.teacher and os.path.abspath(args.teacher)   # a Dassl run is re-evaluated from other folders
    args.clip, args.teacher_clip = clip_path(args.clip), clip_path(args.teacher_clip)
    try:
        learner, backbone = load_stage1(args.backbone, args.device, args.trust_checkpoint, args.clip, args.teacher,
                                        args.teacher_clip)
        dept = "train_backbone.py --dept" if isinstance(learner, prompts.DePT) else None   # who made its head
    except HeadClassesUnknown:   # a DePT folder of the original code, refused before its head is built
        dept = "the original code's ExtrasLinearProbe trainer"
    if dept:   # Fig. 5 sets DPC beside DePT, each on the plain backbone
        raise RunError(f"{args.backbone} is a DePT run ({dept}): DPC is plugged into the plain backbone, beside "
                       f"DePT, not on top of it; pass the run trained without DePT")
    if backbone["data"] is None:
        if not args.data:
            raise RunError(f"{args.backbone} is a Dassl run: pass --data (and --root, --clip) for it")
        backbone.update(data=args.data, args=dict(seed=args.seed or 1, root=args.root or "data"))
    if args.data and args.data != backbone["data"]:
        raise RunError(f"--data {args.data}, but the backbone {args.backbone} was trained on {backbone['data']}: "
                       f"DPC continues on the backbone's own classes; drop --data or pick the matching backbone")
    args.learner, args.clip, args.data = backbone["learner"], backbone["clip"], backbone["data"]
    args.root = os.path.abspath(args.root or backbone["args"]["root"])
    args.seed = backbone["args"]["seed"] if args.seed is None else args.seed
    args.subsample = backbone["args"].get("subsample", "base")
    return learner, backbone


def check_backbone_classes(backbone: dict, classnames: list[str], args) -> None:
    """A backbone of ours trained on the classes DPC trains on (PromptKD: on all classes, unlabeled)."""
    trained_on = backbone.get("classnames")                          # None for a Dassl folder
    if trained_on and args.learner != "promptkd" and trained_on != classnames:
        raise RunError(f"the backbone was trained on other classes ({trained_on[:3]}...) than the base classes "
                       f"of {args.data} under {args.root} ({classnames[:3]}...): wrong --root?")


def find_runs(paths, trust: bool = False) -> list[tuple[str, dict]]:
    """(run folder, checkpoint) of every finished run. A folder named directly must hold a finished
    run; below a folder named directly, unfinished runs are skipped with a note."""
    found = {}
    for path in paths:
        named = os.path.isfile(os.path.join(path, "checkpoint.pt"))
        if not named and not os.path.isdir(path):
            raise RunError(f"{path} is not a folder: pass run folders (with checkpoint.pt) or folders above them")
        below = [path] if named else sorted(d for d, _, files in os.walk(path) if "checkpoint.pt" in files)
        if not below:
            raise RunError(f"no run in {path}: no checkpoint.pt below it; train one with train_backbone.py")
        for run in below:
            ckpt = read_checkpoint(os.path.join(run, "checkpoint.pt"), trust)   # checked: kind, keys, finite
            if ckpt["finished"]:
                found[os.path.abspath(run)] = ckpt
                continue
            message = (f"{run} is an unfinished run (epoch {ckpt['epoch']}/{ckpt['args'].get('epochs')}): "
                       f"finish it with `{SCRIPT[ckpt['kind']]} --resume --output-dir {run}` and its other flags")
            if named:
                raise RunError(message)
            print(f"skipping: {message}", file=sys.stderr)
    if not found:
        raise RunError(f"no finished run in {', '.join(paths)}")
    return sorted(found.items(), key=lambda r: (r[1]["learner"], r[1]["kind"], r[1]["data"], r[1]["args"]["seed"]))


def read_results(run: str) -> dict | None:
    path = os.path.join(run, "results.json")
    check_regular(path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            results = json.load(f)
        if "all" in results:  # a run trained on all classes (Tab. 2 source)
            return dict(all=float(results["all"]))
        return dict(base=float(results["base"]), new=float(results["new"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"cannot read {path} ({type(e).__name__}: {e}); pass --recompute") from None


def load_teacher(teacher_dir: str, teacher_clip: str, device, trust: bool = False):
    """PromptKD's teacher and its args: a finished promptsrc run of this project (trained as
    PROMPTKD_TEACHER_RECIPE; its args are returned for the recipe check), or a released Dassl teacher
    folder teacher_model/<Dataset>/ (VLPromptLearner/model-best.pth.tar) on `teacher_clip` (args None)."""
    if os.path.isfile(os.path.join(teacher_dir, "checkpoint.pt")):
        teacher, ckpt, _ = load_backbone(teacher_dir, device, trust)
        name, args = ckpt["learner"], ckpt["args"]
    else:
        teacher, name = dassl_learner(teacher_dir, teacher_clip, device, trust=trust)
        args = None
    if name != "promptsrc":
        raise RunError(f"--teacher {teacher_dir} is a {name} run; PromptKD's teacher is a promptsrc run")
    if isinstance(teacher, prompts.DePT):
        raise RunError(f"--teacher {teacher_dir} is a promptsrc run with DePT's head (--dept); PromptKD's teacher is "
                       f"a plain promptsrc run")
    return teacher, args


def teacher_recipe_differences(args: dict) -> dict:
    """{flag: (teacher's value, the original recipe's)} where our teacher run left the recipe."""
    return {k: (args.get(k), v) for k, v in PROMPTKD_TEACHER_RECIPE.items() if k != "learner" and args.get(k) != v}


# Dassl folder name -> our learner (VLPromptLearner holds PromptSRC or, with a projector, PromptKD;
# PromptLearner is DePT's CoOp, Koorye/DePT trainers/elp_coop.py, which registers the whole model).
DASSL_FOLDERS = {"prompt_learner": "coop", "MultiModalPromptLearner": "maple", "VLPromptLearner": "promptsrc",
                 "PromptLearner": "coop"}

# DePT's CAT head in the original code -> ours (prompts.DePT): FiLM maps and the linear head.
DEPT_HEAD = {"film_lp_img": "film_image", "film_lp_text": "film_text", "linear_probe_proj": "linear_head"}


def is_dept(state: dict) -> bool:
    """A Dassl state dict of DePT (CoOp or MaPLe + DePT): it holds the CAT head's linear layer."""
    return "linear_probe_proj.weight" in state


def dassl_state(name: str, state: dict) -> dict:
    """Rename a Dassl stage-1 state dict (the original repositories' parameter names) to our learner's
    names (README Differences 11).
    CoOp saves its prompt learner alone (`ctx` + token buffers); MaPLe, PromptSRC and PromptKD save the
    whole model, whose frozen CLIP copies are dropped here, as are the token prefix/suffix buffers.
    PromptKD's projector is 1x1 convolutions there (`VPT_image_trans.conv1.{0,1,3}`), Linear here.
    DePT saves its whole model: the learner's tensors become `learner.*` (CoOp's are under `prompt_learner.`
    there) and its head is renamed by DEPT_HEAD (FiLM fp32, the head fp16 in the original)."""
    if is_dept(state):
        head, rest = {}, {}
        for key, value in state.items():
            module, _, leaf = key.partition(".")
            if module in DEPT_HEAD:
                head[f"{DEPT_HEAD[module]}.{leaf}"] = value.float()
            elif name != "coop":
                rest[key] = value
            elif module == "prompt_learner":   # CoOp's own tensors, as its prompt_learner/ folder holds them
                rest[leaf] = value
        return dict({f"learner.{k}": v for k, v in dassl_state(name, rest).items()}, **head)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.endswith(".VPT_shallow") and not (len(parts) > 3 and parts[3].isdigit()):
            raise RunError(f"the Dassl {name} checkpoint holds {key!r}, which the original code never writes "
                           f"(expected <encoder>.transformer.resblocks.<i>.VPT_shallow): is it damaged?")
        if name in ("promptsrc", "promptkd"):
            if key == "prompt_learner.ctx" and name == "promptsrc":
                key = "ctx"
            elif key == "image_encoder.VPT":
                key = "visual_prompt"
            elif key.endswith(".VPT_shallow") and parts[0] == "image_encoder":
                key = f"visual_deep.{int(parts[3]) - 1}"
            elif key.endswith(".VPT_shallow") and parts[0] == "text_encoder" and name == "promptsrc":
                key = f"text_deep.{int(parts[3]) - 1}"
            elif key.startswith("VPT_image_trans.conv1.") and name == "promptkd":
                key = f"projector.{parts[2]}.{parts[3]}"
                value = value.flatten(1) if value.dim() == 4 else value   # (out, in, 1, 1) -> (out, in)
            else:
                continue
        elif name == "maple":  # MultiModalPromptLearner/ holds the whole model; ours are its prompt learner's
            if parts[0] != "prompt_learner" or parts[1].startswith("token_"):
                continue
            key = key[len("prompt_learner."):]
        elif key.startswith("token_"):
            continue
        out[key] = value.float() if value.is_floating_point() else value
    return out


def read_dassl_checkpoint(path: str, trust: bool = False) -> dict:
    """The `state_dict` of a Dassl checkpoint ({"state_dict", "epoch", "optimizer", "scheduler",
    "val_result"}), read without running code: the pickled optimiser/scheduler objects become Inert."""
    ckpt = load_safely(path, trust, inert_objects=True)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise RunError(f"{path} is not a Dassl checkpoint (no 'state_dict'): pass the run folder of the original "
                       f"code that holds <{'|'.join(DASSL_FOLDERS)}>/model.pth.tar-N")
    check_finite({f"state_dict {k}": v for k, v in state.items()}, path, "use another epoch's file of that run")
    return state


def is_promptkd_student(state: dict) -> bool:
    """A Dassl VLPromptLearner state dict of a PromptKD student: it has the projector, a PromptSRC one has not."""
    return any(k.startswith("VPT_image_trans") for k in state)


def dassl_checkpoint(run_dir: str, trust: bool = False) -> tuple[str, str, dict]:
    """(file, learner name, state_dict) of a stage-1 folder of the original code: <run>/<name>/model.pth.tar-N
    (newest N) or model-best.pth.tar. A PromptKD student is read from model-best.pth.tar when the folder has
    one, as the released DPC code does (PromptKD saves its best-val student)."""
    for folder, name in DASSL_FOLDERS.items():
        files = sorted((p for p in glob.glob(os.path.join(run_dir, folder, "model.pth.tar-*"))
                        if p.rsplit("-", 1)[1].isdigit()), key=lambda p: int(p.rsplit("-", 1)[1]))
        files = files or glob.glob(os.path.join(run_dir, folder, "model-best.pth.tar"))
        if files:
            break
    else:
        raise RunError(f"no finished backbone run in {run_dir}: expected checkpoint.pt (train_backbone.py) "
                       f"or a Dassl folder <run>/<{'|'.join(DASSL_FOLDERS)}>/model.pth.tar-N")
    best, state = os.path.join(run_dir, folder, "model-best.pth.tar"), None
    if folder == "VLPromptLearner" and os.path.isfile(best):   # read once: a student is taken from its best file
        state = read_dassl_checkpoint(best, trust)
        if is_promptkd_student(state):
            files = [best]
        elif files[-1] != best:
            state = None
    state = read_dassl_checkpoint(files[-1], trust) if state is None else state
    return files[-1], "promptkd" if is_promptkd_student(state) else name, state


class HeadClassesUnknown(RunError):
    """A DePT folder of the original code read without the class names of its head's rows."""


def dassl_options(name: str, state: dict, classnames: list[str] = None, path: str = "") -> dict:
    """build_learner's options for a Dassl state dict. DePT's CoOp has M random context tokens (16 in
    DePT's config; the prompt "X X .. X <class>."), MaPLe 2 tokens of "a photo of a". A DePT head's rows are
    classes that Dassl does not record, so `classnames` must name them, in label order (the base classes)."""
    options = dict(n_ctx=2 if name == "maple" else None, ctx_init=None, dept_classes=None)
    if not is_dept(state):
        return options
    if name == "coop" and "prompt_learner.ctx" in state:
        options.update(n_ctx=len(state["prompt_learner.ctx"]), ctx_init="")
    rows = len(state["linear_probe_proj.weight"])
    if classnames is None:
        raise HeadClassesUnknown(f"{path} is a DePT run of the original code: the {rows} classes of its head must be "
                                 f"given (e.g. --data, the dataset it was trained on), Dassl does not record them")
    if rows != len(classnames):
        raise RunError(f"the DePT head in {path} has {rows} rows, but {len(classnames)} class names were given: "
                       f"pass the dataset (--data, --root) whose base classes it was trained on")
    return dict(options, dept_classes=list(classnames))


def dassl_learner(run_dir: str, clip_name: str, device, teacher_dir: str = None, teacher_clip: str = None,
                  trust: bool = False, classnames: list[str] = None):
    """The learner of a stage-1 folder of the original code (dassl_checkpoint); a PromptKD student also
    needs its teacher (load_teacher), a DePT run the class names of its head (dassl_options)."""
    path, name, state = dassl_checkpoint(run_dir, trust)
    options = dassl_options(name, state, classnames, path)   # before CLIP is loaded: a DePT head needs its classes
    teacher = None
    if name == "promptkd":
        if not teacher_dir:
            raise RunError(f"{run_dir} is a Dassl PromptKD run: pass --teacher with its PromptSRC teacher "
                           f"folder (teacher_model/<Dataset>) and --teacher-clip")
        teacher, _ = load_teacher(teacher_dir, teacher_clip, device, trust)
    learner = prompts.build_learner(name, load_clip(clip_name, device), teacher, **options)
    prompts.load_learner_state(learner, dassl_state(name, state))
    print(f"loaded Dassl {name}{' + DePT' if options['dept_classes'] else ''} backbone {path}")
    return learner.to(device).eval(), name


# ------------------------------------------------------------------------------------------------
# The command-line runner: one line per expected error
# ------------------------------------------------------------------------------------------------

ERRORS = (RunError, data.DataError, clip_model.CLIPLoadError, prompts.LearnerError, OSError)


def one_line(e: Exception) -> str:
    """The message of an expected error on one line. An error raised in a DataLoader worker comes
    back wrapped in the worker's traceback: keep its last line, the original message."""
    message = str(e).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    if isinstance(e, OSError) and e.strerror:
        message = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    # a file name that is not UTF-8 (a surrogate-escaped str) is backslash-escaped: printable anywhere
    return message.replace("\n", " ").encode("utf-8", "backslashreplace").decode("utf-8")


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a container stop, `kill`, Slurm's preemption or time limit), handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    """Stop once: further signals (Slurm signals every process of a job, tools/reproduce.py forwards its
    own) are ignored while the run winds down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


class QuietStdout:
    """sys.stdout that goes quiet when its reader goes away (`evaluate.py … | head -1`): the files (log.txt,
    results.json, table.md) are the record and stdout only a view of it, so the work goes on and nothing
    prints a traceback. The closed pipe is replaced by /dev/null, so later writes and the final flush
    succeed."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):   # encoding, fileno, isatty, ... of the stream
        return getattr(self.stream, name)

    def _quiet(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._quiet()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._quiet()
            self.stream.flush()


def run_cli(main_fn, get_args_fn, argv=None, errors=(), resume_hint="rerun the same command with --resume"):
    """Entry point of every script: an expected failure ends in ONE line on stderr and exit code 2;
    Ctrl-C (exit code 130) or SIGTERM (143) ends in one line, keeping the last finished epoch's
    checkpoint. The run folder's lock is let go on the way out, whatever the way. A closed stdout
    (`| head`) silences the output, not the run (QuietStdout)."""
    main_thread = threading.current_thread() is threading.main_thread()   # only it may set handlers
    before = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    stdout = sys.stdout
    if not isinstance(stdout, QuietStdout) and hasattr(stdout, "fileno"):
        try:
            stdout.fileno()
            sys.stdout = QuietStdout(stdout)
        except (OSError, ValueError, io.UnsupportedOperation):   # a stream without a file (pytest's capture)
            pass
    try:
        return main_fn(get_args_fn(argv))
    except ERRORS + tuple(errors) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name}): finished runs and the last finished epoch of a "
              f"training run are kept; {resume_hint}", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        release_run_folder()
        sys.stdout = stdout
        for s, handler in before.items():
            signal.signal(s, handler)
