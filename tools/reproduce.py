"""Run the whole base-to-new protocol of the DPC paper (Li et al., CVPR 2025, §4.2, Tab. 1) in one command.

Per (dataset, seed, learner) one chain of runs, each a call of the project's own scripts:
  [promptkd only] its teacher: train_backbone.py with backbones.PROMPTKD_TEACHER_RECIPE
                  (PromptSRC on --teacher-clip) -> RUN_ROOT/teachers/<data>/seed<s>   (not a Tab. 1 row)
  stage 1         train_backbone.py --learner <l> ...        -> RUN_ROOT/<data>/<l>/seed<s>
  stage 2         train_dpc.py --backbone <stage-1 folder>   -> RUN_ROOT/<data>/<l>_dpc/seed<s>
  [--dept only]   train_backbone.py --learner <l> --dept ... -> RUN_ROOT/<data>/<l>_dept/seed<s>
                  (Fig. 5's + DePT: a stage-1 run of its own, with DePT's recipe; none for promptkd, for
                  which DePT is not defined; last in its chain, so its failure stops nothing else)
then evaluate.py on every stage-1, DPC and DePT folder -> RUN_ROOT/evaluation (table.md: the Tab. 1 layout;
with --dept also fig5.md: the H of each backbone, + DePT and + DPC).

Each run's state is decided when its turn comes: finished (its checkpoint.pt says so) -> skipped,
unfinished -> continued with --resume, no checkpoint -> trained. So after a crash, Ctrl-C, SIGTERM or
a reboot, the same command continues where it stopped. A failed run stops its own chain only; the
failures are listed at the end (exit code 1). With several visible GPUs the chains run at once, one
per GPU (CUDA_VISIBLE_DEVICES=<id> for its processes); otherwise one after the other. A run's
output goes to <run folder>/stdout.txt (its training log is <run folder>/log.txt).

Several drivers may share one --out (two terminals, a resubmitted job, Slurm tasks): a chain is run by
one driver at a time (a lock per chain, released by the OS when its driver dies); another driver
comes back to it after its other chains, and waits for a run folder that some process still writes.
SIGINT and SIGTERM are forwarded to the running run, which keeps its last finished epoch; the tool
waits for it, then exits (130 / 143). A Slurm array task (--slurm) is `reproduce.py --task N`: the
same logic for one chain, so a requeued, resubmitted or partly finished task just continues.

    python tools/reproduce.py --datasets eurosat,dtd --root /data --workers 8
    python tools/reproduce.py --datasets eurosat --learners coop --seeds 1 --backbone-flags "--epochs 10 --lr 0.002"
    python tools/reproduce.py --datasets eurosat,dtd --root /data --learners coop,maple,promptsrc --dept  # + Fig. 5
    python tools/reproduce.py --root /data --dry-run | parallel -j 4      # one chain per line, any engine
    python tools/reproduce.py --root /data --slurm tab1.sbatch            # a Slurm job array, one chain per task
    python tools/reproduce.py --datasets toy --clip toy --teacher-clip toy --workers 0   # the toy world, on a CPU
"""
import argparse
import itertools
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import backbones  # noqa: E402
import checkpoints  # noqa: E402
import command_line  # noqa: E402
import data  # noqa: E402
import prompts  # noqa: E402
import run_folder  # noqa: E402
import scoring  # noqa: E402

GENERATED = ("toy", "synthetic")  # written under --root by the scripts on first use
# Set by this tool: passed through, they would break the run tree (argparse also takes their prefixes).
RESERVED = ("--learner", "--data", "--root", "--seed", "--clip", "--teacher", "--backbone", "--output-dir",
            "--resume", "--overwrite", "--dept")


def get_args(argv=None):
    p = command_line.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", default=",".join(scoring.PAPER_DATASETS),
                   help="comma-separated: Tab. 1 datasets, toy, synthetic or an ImageFolder folder under --root")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated run seeds (the protocol averages 1, 2, 3)")
    p.add_argument("--learners", default=",".join(prompts.LEARNERS), help="comma-separated prompt learners")
    p.add_argument("--root", default="data", help="folder holding the datasets")
    p.add_argument("--out", default=os.path.join("output", "reproduce"), help="RUN_ROOT: where the run folders go")
    p.add_argument("--clip", default="ViT-B/16", help="CLIP of every stage-1 and DPC run")
    p.add_argument("--teacher-clip", default="ViT-L/14", help="CLIP of PromptKD's PromptSRC teacher")
    p.add_argument("--workers", type=int, default=None, help="--workers of every script (default: theirs)")
    p.add_argument("--backbone-flags", default="", help='more flags of the stage-1 runs, e.g. "--epochs 10" '
                   '(one flag alone: --backbone-flags=--flag)')
    p.add_argument("--teacher-flags", default="", help="more flags of the teacher runs (after the recipe's: they win)")
    p.add_argument("--dpc-flags", default="", help="more flags of the train_dpc.py runs")
    p.add_argument("--dept", action="store_true",
                   help="Fig. 5: also a + DePT run per chain (train_backbone.py --dept, DePT's recipe; not for promptkd)")
    p.add_argument("--dept-flags", default="", help="more flags of the DePT runs (after DePT's recipe: they win)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the chains left to run, one shell line each")
    mode.add_argument("--slurm", metavar="FILE", default=None, help="write a Slurm job-array script, one chain a task")
    mode.add_argument("--task", type=int, default=None, metavar="N",
                      help="run chain N of the plan only, without the table (what each Slurm array task runs)")
    args = p.parse_args(argv)
    args.root, args.out = os.path.abspath(args.root), os.path.abspath(args.out)
    check(os.path.commonpath([args.root, args.out]) not in (args.root, args.out),
          f"--out {args.out} and --root {args.root} overlap: run folders would be written among the datasets "
          f"(<out>/<dataset>/...); choose an --out outside --root")
    args.datasets, args.learners, args.seeds = (split_list(getattr(args, n), "--" + n)
                                                for n in ("datasets", "learners", "seeds"))
    args.datasets = [data.dataset_name(d) for d in args.datasets]   # CoOp's config names too (imagenetv2)
    known = scoring.PAPER_DATASETS + GENERATED
    for d in args.datasets:
        check(d in known or os.path.isdir(os.path.join(args.root, d)),
              f"--datasets: unknown dataset {d!r} (known: {', '.join(known)}, or a folder under --root {args.root})")
    for x in args.learners:
        check(x in prompts.LEARNERS, f"--learners: unknown learner {x!r} (choose from {', '.join(prompts.LEARNERS)})")
    for s in args.seeds:
        check(s.isascii() and s.isdigit(), f"--seeds: {s!r} is not a non-negative integer")
    args.seeds = [int(s) for s in args.seeds]
    for name in ("backbone_flags", "teacher_flags", "dpc_flags", "dept_flags"):
        setattr(args, name, split_flags(getattr(args, name), "--" + name.replace("_", "-")))
    args.workers = [] if args.workers is None else ["--workers", str(args.workers)]   # flags of every script
    n = len(args.datasets) * len(args.seeds) * len(args.learners)
    check(args.task is None or 0 <= args.task < n, f"--task {args.task}: the plan has chains 0-{n - 1}")
    return args


def check(ok: bool, message: str) -> None:
    """Input errors end in one line and exit code 2, before anything runs (the project's convention)."""
    if not ok:
        raise run_folder.RunError(message)


def split_list(text: str, option: str) -> list[str]:
    """Duplicates are refused: two chains would train the same folder at once."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    check(bool(items), f"{option} is empty; give a comma-separated list")
    twice = sorted({x for x in items if items.count(x) > 1})
    check(not twice, f"{option} lists {', '.join(twice)} more than once")
    return items


def split_flags(text: str, option: str) -> list[str]:
    """Split as a shell would; the flags this tool sets itself are refused (RESERVED)."""
    try:
        flags = shlex.split(text)
    except ValueError as e:
        raise run_folder.RunError(f"{option}: cannot parse {text!r} ({e})") from None
    for flag in (f.split("=")[0] for f in flags if f.startswith("--")):
        check(not any(r.startswith(flag) for r in RESERVED),
              f"{option}: {flag} is set by this tool (reserved: {', '.join(RESERVED)}); use its own options")
    return flags


def plan(args) -> list[list[tuple[str, list[str]]]]:
    """Every chain of Tab. 1: a list of (run folder, [script, flags...]) in dependency order. Each
    promptkd chain trains its own teacher (one per dataset and seed), so chains never share a folder.
    With --dept, a chain ends with its learner's + DePT run (Fig. 5), which needs none of the others."""
    chains = []
    for d in args.datasets:
        for s in args.seeds:
            for learner in args.learners:
                common = ["--data", d, "--root", args.root, "--seed", str(s)] + args.workers
                chain, teacher_flag = [], []
                stage1, dpc = (os.path.join(args.out, d, name, f"seed{s}") for name in (learner, learner + "_dpc"))
                if learner == "promptkd":
                    teacher = os.path.join(args.out, "teachers", d, f"seed{s}")
                    recipe = dict(backbones.PROMPTKD_TEACHER_RECIPE, clip=args.teacher_clip)
                    flags = [x for k, v in recipe.items() for x in (f"--{k.replace('_', '-')}", str(v))]
                    chain.append((teacher, ["train_backbone.py"] + flags + common + args.teacher_flags
                                  + ["--output-dir", teacher]))
                    teacher_flag = ["--teacher", teacher]
                chain.append((stage1, ["train_backbone.py", "--learner", learner] + teacher_flag + common
                              + ["--clip", args.clip] + args.backbone_flags + ["--output-dir", stage1]))
                chain.append((dpc, ["train_dpc.py", "--backbone", stage1] + args.workers + args.dpc_flags
                              + ["--output-dir", dpc]))
                if args.dept and learner != "promptkd":   # DePT's head needs labelled base classes
                    dept = os.path.join(args.out, d, learner + "_dept", f"seed{s}")
                    chain.append((dept, ["train_backbone.py", "--learner", learner, "--dept"] + common
                                  + ["--clip", args.clip] + args.dept_flags + ["--output-dir", dept]))
                chains.append(chain)
    return chains


def state(run_dir: str) -> str:
    """'finished', 'resume' (the checkpoint of an unfinished run) or 'run' (none yet). An unreadable
    checkpoint counts as unfinished: the script then says what is wrong with it."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return "run"
    try:
        return "finished" if checkpoints.read_checkpoint(path)["finished"] else "resume"
    except run_folder.RunError:
        return "resume"


def command(python: str, argv: list[str], resume: bool) -> list[str]:
    """Absolute script paths: the commands work from any folder, and on a cluster node."""
    return [python, os.path.join(REPO, argv[0])] + argv[1:] + (["--resume"] if resume else [])


def shell_lines(chains) -> list[str]:
    """The chains with work left as shell lines, for --dry-run and --slurm (states as of now)."""
    lines = []
    for chain in chains:
        todo = [command("python", argv, st == "resume") for run_dir, argv in chain
                if (st := state(run_dir)) != "finished"]
        lines += [" && ".join(shlex.join(cmd) for cmd in todo)] if todo else []
    return lines


def stage1_dir(chain) -> str:
    """The folder a chain is named after (its lock, its status lines): the stage-1 run, its DPC run's --backbone."""
    argv = next(argv for _, argv in chain if argv[0] == "train_dpc.py")
    return argv[argv.index("--backbone") + 1]


def evaluate_command(python: str, args, chains) -> list[str]:
    """Tab. 1 (and Fig. 5) over every stage-1, DPC and DePT folder, named one by one (a missing run is an
    error, not a gap): each chain's runs from its stage 1 on, not PromptKD's teacher before it."""
    run_dirs = [run_dir for chain in chains
                for run_dir, _ in chain[[d for d, _ in chain].index(stage1_dir(chain)):]]
    return [python, os.path.join(REPO, "evaluate.py")] + run_dirs + ["--out", os.path.join(args.out, "evaluation")] \
        + args.workers


def driver_flags(args) -> list[str]:
    """This tool's own flags, as an array task repeats them (plan() then numbers the chains the same way)."""
    flags = ["--datasets", ",".join(args.datasets), "--seeds", ",".join(map(str, args.seeds)), "--learners",
             ",".join(args.learners), "--root", args.root, "--out", args.out, "--clip", args.clip,
             "--teacher-clip", args.teacher_clip] + args.workers + ["--dept"] * args.dept
    return flags + [f"--{name.replace('_', '-')}={shlex.join(getattr(args, name))}"
                    for name in ("backbone_flags", "teacher_flags", "dpc_flags", "dept_flags") if getattr(args, name)]


def slurm_quote(path: str) -> str:
    """A path as an #SBATCH option value: sbatch splits those lines at spaces unless they are in double quotes."""
    return f'"{path}"'


def write_slurm(path: str, tasks: list[int], task_line: str, evaluate_line: str, logs: str) -> None:
    """One chain per array task, run by this tool (--task), so its state is decided when the task runs;
    the table is a separate job that waits for all of them (afterok)."""
    if '"' in logs or "\n" in logs:
        raise run_folder.RunError(f"--out {logs!r} holds a double quote or a line break, which an #SBATCH line cannot carry: "
                       f"choose another --out")
    with open(path, "w") as f:
        f.write(f"#!/bin/bash\n# DPC base-to-new protocol (paper Tab. 1) by tools/reproduce.py: {len(tasks)} chains, "
                f"one per array task.\n# Each task runs its chain like tools/reproduce.py on a workstation: finished "
                f"runs are skipped,\n# interrupted ones resumed. A preempted task is requeued (--requeue) and continues; "
                f"one that\n# hit its time limit stops cleanly (SIGTERM 120 s before) and continues when resubmitted.\n"
                f"# Submit it, then the table, which waits until every task succeeded:\n"
                f"#   jobid=$(sbatch --parsable {path})\n"
                f"#   sbatch --dependency=afterok:$jobid --wrap {shlex.quote(evaluate_line)}\n"
                f"#SBATCH --job-name=dpc-tab1\n#SBATCH --array={','.join(map(str, tasks))}\n#SBATCH --gres=gpu:1\n"
                f"#SBATCH --output={slurm_quote(logs + '/%A_%a.out')}\n#SBATCH --open-mode=append\n#SBATCH --requeue\n"
                f"#SBATCH --signal=B:TERM@120\nset -eo pipefail\ncd {shlex.quote(os.getcwd())}\n"
                f"# exec: the signal reaches this tool, which forwards it to the run and waits for it\n"
                f'exec {task_line} --task "$SLURM_ARRAY_TASK_ID"\n')


def visible_gpus() -> list[str]:
    """The GPUs to run chains on, one process each. CUDA ignores the entries after an invalid one (-1)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(torch.cuda.device_count())]
    return list(itertools.takewhile(lambda e: e and not e.startswith("-"), (e.strip() for e in listed.split(","))))


_SAY = threading.Lock()


def say(line: str) -> None:
    """One status line from a chain's thread. print() writes the text and its newline separately, so
    two chains printing at once (several GPUs) would run their lines together: one write, under a lock."""
    with _SAY:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class Stop(threading.Event):
    """Set when the tool is told to stop; `signum` is the signal it got, which each running run is sent."""
    signum = signal.SIGINT


def chain_lock(args, chain) -> str:
    """The lock file of a chain, named after its stage-1 folder: <out>/.chain-<data>-<learner>-seed<s>.lock."""
    return os.path.join(args.out, ".chain-" + os.path.relpath(stage1_dir(chain), args.out).replace(os.sep, "-") + ".lock")


def acquire(lock: str, stop: Stop, what: str) -> int | None:
    """Wait for the lock file `lock`, polling so that the tool can still be stopped: its fd, or None if
    stopped first. Says once who holds it ('waiting: <what> pid N on HOST since ...')."""
    fd = run_folder.hold_lock(lock)
    if fd is None:
        say(f"waiting: {what} {run_folder.lock_holder(lock)}")
    while fd is None and not stop.is_set():
        time.sleep(1)
        fd = run_folder.hold_lock(lock)
    return fd


def wait_until(free, stop: Stop, message: str) -> bool:
    """Poll free() until it is true (True) or the tool is stopped (False); say once why it waits."""
    if not free():
        say(message)
    while not free():
        if stop.is_set():
            return False
        time.sleep(1)
    return True


def run_chain(chain, lock: str, gpus: queue.Queue, stop: Stop, failed: list, busy: list | None) -> None:
    """One run after the other, each state decided when its turn comes; the first failure ends the chain.
    The chain is this driver's alone while it runs (lock); if another driver has it, it goes to `busy`
    (come back later), or, with busy None, this driver waits for it."""
    fd = run_folder.hold_lock(lock)
    if fd is None and busy is not None:
        say(f"busy: {stage1_dir(chain)} (its chain is run by {run_folder.lock_holder(lock)}); back to it after the others")
        busy.append(chain)
        return
    fd = fd if fd is not None else acquire(lock, stop, f"the chain of {stage1_dir(chain)} is run by")
    if fd is None:
        return
    gpu = gpus.get()   # a free GPU for the whole chain: never two processes on one GPU
    try:
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {}))
        where = f" [GPU {gpu}]" if gpu else ""
        for run_dir, argv in chain:
            writer = os.path.join(run_dir, run_folder.LOCK_FILE)   # a run left by a killed driver may still train
            if stop.is_set() or not wait_until(lambda: not run_folder.is_locked(writer), stop,
                                               f"waiting: {run_dir} is being written by {run_folder.lock_holder(writer)}"):
                return
            st = state(run_dir)
            say(f"{'skip (finished)' if st == 'finished' else st}: {run_dir}{where}")
            if st == "finished":
                continue
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "stdout.txt"), "a") as out:
                t0, rc = time.time(), run_command(command(sys.executable, argv, st == "resume"), env, stop, out)
            if stop.is_set() or rc in (130, 143, -signal.SIGINT, -signal.SIGTERM):   # one stopped run stops the tool
                stop.set()
                return
            if rc != 0:   # keep the failure's own message: the scripts end with one `error: ...` line
                with open(os.path.join(run_dir, "stdout.txt"), errors="replace") as f:
                    failed.append((run_dir, rc, ([x.strip() for x in f if x.strip()] or [""])[-1]))
                say(f"failed: {run_dir} (exit {rc}); the other chains go on")
                return
            say(f"done: {run_dir} ({time.time() - t0:.0f} s)")
    finally:
        gpus.put(gpu)
        run_folder.release_lock(lock, fd)


def run_command(cmd: list[str], env: dict, stop: Stop, out=None) -> int:
    """Run cmd (output to `out`, e.g. <run folder>/stdout.txt: chains on several GPUs would interleave on a
    terminal) and wait for it. When the tool is stopped, the run gets the tool's signal, once, and is waited
    for: it exits cleanly keeping its last finished epoch, never left behind as an orphan."""
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env)
    signalled = False
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt as e:   # called from the main thread (the table): the signal came here
            stop.signum = getattr(e, "signum", signal.SIGINT)
            stop.set()
        if stop.is_set() and not signalled:
            proc.send_signal(stop.signum)
            signalled = True


def print_plan(args, chains, eval_cmd: str) -> None:
    """--dry-run: chains on stdout, one per line (for xargs -P / parallel); the table's command on stderr.
    --slurm: the array tasks of the chains with work left."""
    lines = shell_lines(chains)
    if args.dry_run:
        print("\n".join(lines))
        print(f"# {len(lines)} chains left; once all succeeded, the table: {eval_cmd}", file=sys.stderr)
        return
    tasks = [i for i, chain in enumerate(chains) if any(state(run_dir) != "finished" for run_dir, _ in chain)]
    if tasks:
        os.makedirs(os.path.join(args.out, "slurm"), exist_ok=True)   # Slurm does not create --output folders
        task_line = shlex.join(["python", os.path.join(REPO, "tools", "reproduce.py")] + driver_flags(args))
        write_slurm(args.slurm, tasks, task_line, eval_cmd, os.path.join(args.out, "slurm"))
        print(f"wrote {args.slurm}: {len(tasks)} array tasks. Submit it, then the table:\n  jobid=$(sbatch "
              f"--parsable {args.slurm})\n  sbatch --dependency=afterok:$jobid --wrap {shlex.quote(eval_cmd)}")
    else:
        print(f"every run is finished, nothing to submit; the table: {eval_cmd}")


def run_chains(chains, args, gpus: list[str], stop: Stop, failed: list) -> None:
    """Every chain, one per GPU at a time; chains another driver is running come last, waited for."""
    slots = queue.Queue()
    for gpu in gpus if len(gpus) > 1 else [None]:
        slots.put(gpu)
    with ThreadPoolExecutor(slots.qsize()) as pool:
        try:
            busy = []
            for future in [pool.submit(run_chain, chain, chain_lock(args, chain), slots, stop, failed, busy)
                           for chain in chains]:
                future.result()
            for future in [pool.submit(run_chain, chain, chain_lock(args, chain), slots, stop, failed, None)
                           for chain in busy]:
                future.result()
        except BaseException as e:   # Ctrl-C / SIGTERM: no new run starts, running ones get the same signal
            stop.signum = getattr(e, "signum", signal.SIGINT)
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def main(args):
    chains = plan(args)
    eval_cmd = evaluate_command(sys.executable, args, chains)
    if args.dry_run or args.slurm:
        return print_plan(args, chains, shlex.join(["python"] + eval_cmd[1:]))
    gpus = visible_gpus() if args.task is None else []   # an array task has its own GPU
    if len(gpus) > 1:   # else concurrent chains would all generate the same toy/synthetic folder at once
        for d in set(args.datasets) & set(GENERATED):
            data.load_splits(d, args.root, 0, 1)
    todo = chains if args.task is None else [chains[args.task]]
    print(f"{len(todo)} chains, {sum(map(len, todo))} runs, " + (f"one chain per GPU on {len(gpus)} GPUs"
          if len(gpus) > 1 else "one chain after the other"), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stop, failed = Stop(), []
    run_chains(todo, args, gpus, stop, failed)
    for run_dir, rc, message in failed:
        print(f"failed: {run_dir} (exit {rc}): {message}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} run(s) failed and stopped their chains" + ("; evaluation skipped" if args.task is None
              else "") + ": fix them and rerun this command (finished runs are skipped)", file=sys.stderr)
        sys.exit(1)
    if args.task is None and not stop.is_set():
        lock = os.path.join(args.out, ".evaluation.lock")   # drivers sharing --out write the table one at a time
        fd = acquire(lock, stop, "the table is being written by")
        try:
            if fd is not None and run_command(eval_cmd, os.environ, stop) != 0 and not stop.is_set():
                print("failed: evaluate.py (its message is above)", file=sys.stderr)
                sys.exit(1)
        finally:
            if fd is not None:
                run_folder.release_lock(lock, fd)
    if stop.is_set():
        raise command_line.Interrupted(stop.signum)


if __name__ == "__main__":
    command_line.run_cli(main, get_args, resume_hint="rerun the same command to continue")
