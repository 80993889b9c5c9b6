"""The command line every script shares: its flags and their checks, --resume's rule, one-line errors.

  - flags of every training script (add_run_flags) and their checks, all before anything is written;
  - the run folder taken and checked (check_run_folder): a finished run is never touched without
    --overwrite, and --resume continues a run only with the flags it was started with (changed_flags);
  - what may differ between the seed runs of one Tab. 1 row (setting_differences);
  - run_cli, every script's entry point: an expected error ends in ONE line and exit code 2, Ctrl-C or
    SIGTERM ends cleanly keeping the last finished epoch (docs/faults.md).
"""

import argparse
import io
import os
import re
import signal
import sys
import threading

import torch

import checkpoints
import clip_model
import data
import prompts
import run_folder
from run_folder import RunError


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
                        "they are read as plain data, docs/loading_safely.md)")


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


class DPCError(ValueError):
    """A bad DPC flag or mismatched prompt tensors (train_dpc.py, evaluate.py): one line, what to change."""


def check_omegas(omega_b: float, omega_n: float) -> None:
    """ω_b divides the released step's gradient, so 0 is refused here (the released code has no guard)."""
    if not 0.0 < omega_b <= 1.0:  # `not` form also rejects NaN
        raise DPCError(f"--omega-b must be in (0, 1] (Decoupling divides by it); got {omega_b}")
    if not 0.0 <= omega_n <= 1.0:
        raise DPCError(f"--omega-n must be in [0, 1] (0 = new classes use the tuned prompt P only); got {omega_n}")


def check_topk(topk: int, n_base: int) -> int:
    """The K to use: K > n_base is clamped (EuroSAT has 5 base classes; the released code crashes there);
    K < 2 leaves no hard negative."""
    if n_base < 2:
        raise DPCError(f"DPC needs at least 2 base classes to build hard negatives; got {n_base}")
    if topk < 2:
        raise DPCError(f"--topk must be at least 2 (the ground truth plus one hard negative); got {topk}")
    return min(topk, n_base)


def check_not_a_source(output_dir: str, **sources) -> None:
    """--output-dir must not be a run this one reads (--backbone, --teacher, --continue-from):
    writing there, even with --overwrite, would destroy the run it starts from."""
    for flag, folder in sources.items():
        if folder and os.path.realpath(folder) == os.path.realpath(output_dir):
            raise RunError(f"--output-dir {output_dir} is the --{flag.replace('_', '-')} run itself: writing there "
                           f"would destroy it; choose another --output-dir")


# ------------------------------------------------------------------------------------------------
# The run folder taken, and what --resume may change
# ------------------------------------------------------------------------------------------------

def check_run_folder(args, kind: str = "backbone"):
    """Take the run folder (lock_run_folder: one writer), then, before anything is written, the
    unfinished checkpoint to resume from, or None. A finished run is never touched without --overwrite;
    --resume continues a run only with the flags it was started with (changed_flags)."""
    run_folder.lock_run_folder(args.output_dir)   # before the folder's state is read: no second process reads it too
    path = os.path.join(args.output_dir, "checkpoint.pt")
    if not os.path.lexists(path) or args.overwrite:
        return None
    previous = checkpoints.read_checkpoint(path, args.trust_checkpoint)
    if previous["kind"] != kind:
        raise RunError(f"{args.output_dir} holds a {previous['kind']} run of {checkpoints.SCRIPT[previous['kind']]}, not a "
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


# What --resume may change: how a run is executed, not what it computes (docs/clusters.md).
HOW_FLAGS = ("resume", "overwrite", "output_dir", "workers", "print_every", "device", "feature_cache",
             "trust_checkpoint")


def changed_flags(stored: dict, given: dict) -> list[str]:
    """'--flag stored -> given' for every flag that changes what a run computes (all but HOW_FLAGS) and
    differs from the run's stored args. A flag the run did not record (an older version) is not compared."""
    return [f"--{k.replace('_', '-')} {stored[k]!r} -> {given[k]!r}" for k in given
            if k in stored and k not in HOW_FLAGS and stored[k] != given[k]]


# What differs between the seed runs of one experiment (a Tab. 1 row averages seeds of one experiment):
# the seed, where its data and its per-seed inputs lie, and how it ran. The CLIP is compared by content.
PER_SEED = HOW_FLAGS + ("seed", "root", "backbone", "teacher", "continue_from", "imported_from", "dassl_run", "clip",
                        "clip_digest")


def file_digest(path: str, _memo={}) -> str:
    """SHA-256 of a file's bytes (clip_model.file_sha256), once per (path, size, mtime) in this process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        _memo[key] = clip_model.file_sha256(path)
    return _memo[key]


def same_clip(a: dict, b: dict) -> bool:
    """Two runs' CLIP (their args), by content: the digests of the tensors each loaded (clip_digest, recorded by
    every script), so OpenAI's archive and a Hugging Face copy of the same weights are one CLIP. A run from before
    the digest was recorded: the same --clip name, or two files with the same bytes (a copy, another mount)."""
    if a.get("clip_digest") and b.get("clip_digest"):
        return a["clip_digest"] == b["clip_digest"]
    x, y = str(a.get("clip")), str(b.get("clip"))
    return x == y or (os.path.isfile(x) and os.path.isfile(y) and file_digest(x) == file_digest(y))


def setting_differences(a: dict, b: dict) -> list[str]:
    """'--flag x vs y' for every setting (a run's args, PER_SEED left out) in which two runs of one row differ;
    the CLIP weights by content (same_clip)."""
    out = [f"--{k.replace('_', '-')} {a[k]!r} vs {b[k]!r}" for k in sorted(set(a) & set(b))   # an older run's
           if k not in PER_SEED and a[k] != b[k]]                                                  # unknown flag: not compared
    if not same_clip(a, b):
        out.append(f"--clip {a.get('clip')!r} vs {b.get('clip')!r} (other weights)")
    return out


# ------------------------------------------------------------------------------------------------
# The command-line runner: one line per expected error
# ------------------------------------------------------------------------------------------------

ERRORS = (RunError, DPCError, data.DataError, clip_model.CLIPLoadError, prompts.LearnerError, OSError)


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
        run_folder.release_run_folder()
        sys.stdout = stdout
        for s, handler in before.items():
            signal.signal(s, handler)
