"""tools/reproduce.py: the whole base-to-new protocol in one command (paper Tab. 1), CPU only.

End to end in the toy world (a smaller copy of its benchmark): coop and promptkd (with its teacher) on one
seed, with --dept (coop + DePT, Fig. 5; none for promptkd), interrupted with Ctrl-C while coop's DPC run
trains, then rerun in the multi-GPU mode, where both chains have work: the second call must run exactly
what the first left. The driver and the runs it starts are processes of their own, forked (tests/forked.py):
test_cluster.py's Slurm task and test_user_inputs.py's closed stdout start the scripts as fresh `python`
processes. The other tests plan on fake checkpoints (only their `finished` flag is read) and run no training.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import backbones
import checkpoints
import command_line
import forked
import toy_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import reproduce  # noqa: E402

LINE = re.compile(r"^(skip \(finished\)|resume|run|done|failed): (\S+)")
DEPT = ["--dept", "--dept-flags", "--epochs 1 --batch-size 8 --workers 0 --shots 4"]   # Fig. 5's + DePT runs


def toy_argv(tmp, *more, seeds="1,2", teacher="--epochs 3 --workers 0 --shots 4 --print-every 1",
             dpc="--epochs 1 --workers 0 --shots 4"):
    return ["--datasets", "toy", "--root", str(tmp / "data"), "--clip", "toy", "--teacher-clip", "toy",
            "--seeds", seeds, "--learners", "coop,promptkd", "--out", str(tmp / "runs"),
            "--backbone-flags", "--epochs 1 --workers 0 --shots 4", "--teacher-flags", teacher, "--dpc-flags", dpc, *more]


# The end-to-end call: one seed, the DPC runs 2 epochs long (coop's is stopped in its second), the teacher 1.
END_TO_END = dict(seeds="1", teacher="--epochs 1 --workers 0 --shots 4",
                  dpc="--epochs 2 --workers 0 --shots 4 --print-every 1")


def actions(stdout: str) -> dict:
    """{run folder: [what the tool said about it, in order]} from its log lines."""
    said = {}
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            said.setdefault(m.group(2), []).append(m.group(1))
    return said


def snapshot(runs):
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in runs.rglob("checkpoint.pt")}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    toy_world.make_toy_dataset(str(tmp / "data"), n_train=16, n_val=0, n_test=4)   # the toy world, fewer images
    argv = toy_argv(tmp, *DEPT, **END_TO_END)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")      # first call: one chain at a time
    dpc = tmp / "runs" / "toy" / "coop_dpc" / "seed1"
    t0 = time.time()
    proc = forked.start(tmp, "tools/reproduce.py", *argv, env=env, new_session=True, runs_forked=True)
    first = []
    for line in proc.stdout:
        first.append(line)
        if line.startswith(f"run: {dpc}"):
            break
    while "epoch 2/2 it 1/" not in ((dpc / "log.txt").read_text() if (dpc / "log.txt").exists() else ""):
        assert proc.poll() is None and time.time() - t0 < 120, "coop's DPC run never reached epoch 2"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)          # Ctrl-C in a terminal: the tool and its run
    out, err = proc.communicate(timeout=60)
    first = "".join(first) + out
    before = {str(p.parent): checkpoints.read_checkpoint(str(p))["finished"] for p in (tmp / "runs").rglob("checkpoint.pt")}
    kept = snapshot(tmp / "runs")
    env["CUDA_VISIBLE_DEVICES"] = "0,1"         # second call: two chains at a time, one per "GPU"
    second = forked.run(tmp, "tools/reproduce.py", *argv, env=env, timeout=300, runs_forked=True)
    return dict(tmp=tmp, argv=argv, first=first, first_rc=proc.returncode, first_err=err, before=before, kept=kept,
                second=second, seconds=time.time() - t0)


@pytest.mark.slow
def test_interrupted_then_rerun_runs_only_what_is_missing(toy):
    runs = toy["tmp"] / "runs"
    assert toy["first_rc"] == 130 and toy["first_err"].strip().splitlines()[-1].startswith("interrupted (SIGINT):")
    first = actions(toy["first"])
    coop, coop_dpc = str(runs / "toy" / "coop" / "seed1"), str(runs / "toy" / "coop_dpc" / "seed1")
    assert list(first) == [coop, coop_dpc] and first[coop] == ["run", "done"]
    assert first[coop_dpc] == ["run"]                                  # stopped during its epoch 2
    assert toy["before"] == {coop: True, coop_dpc: False}

    assert toy["second"].returncode == 0, toy["second"].stderr
    second = actions(toy["second"].stdout)
    every = {str(runs / d / "seed1") for d in ("toy/coop", "toy/coop_dpc", "toy/coop_dept", "toy/promptkd",
                                               "toy/promptkd_dpc", "teachers/toy")}
    assert set(second) == every
    expected = {True: ["skip (finished)"], False: ["resume", "done"], None: ["run", "done"]}
    for run_dir, said in second.items():   # finished: skipped; interrupted: resumed; never started: run
        assert said == expected[toy["before"].get(run_dir)], (run_dir, toy["second"].stdout)
    # both chains had work, and each ran on a "GPU" of its own
    assert set(re.findall(r"\[GPU ([01])\]", toy["second"].stdout)) == {"0", "1"}, toy["second"].stdout
    after = snapshot(runs)
    assert all(after[p] == kept for p, kept in toy["kept"].items() if toy["before"][os.path.dirname(p)])
    assert checkpoints.read_checkpoint(os.path.join(coop_dpc, "checkpoint.pt"))["epoch"] == 2
    assert "resuming after epoch 1" in open(os.path.join(coop_dpc, "log.txt")).read()
    assert not (runs / "toy" / "promptkd_dept").exists()              # DePT is not defined for PromptKD
    table = (runs / "evaluation" / "table.md").read_text()
    assert "CoOp" in table and "PromptKD" in table and "+ DPC" in table and "+ DePT" in table and "Teacher" not in table
    fig5 = json.loads((runs / "evaluation" / "results.json").read_text())["fig5"]   # evaluate.py got the DePT runs
    assert [r["learner"] for r in fig5["rows"]] == ["coop"] and fig5["left_out"] == ["promptkd"]
    assert None not in fig5["rows"][0]["average"].values() and "| CoOp |" in (runs / "evaluation" / "fig5.md").read_text()
    print(f"end to end (both calls): {toy['seconds']:.0f} s")


def test_dry_run_after_everything_finished_is_empty(toy, capsys):
    command_line.run_cli(reproduce.main, reproduce.get_args, toy["argv"] + ["--dry-run"])
    assert capsys.readouterr().out.strip() == ""


def fake_run(run_dir, finished, kind="backbone"):
    """A checkpoint of the scripts' schema with no tensors: what the tool reads of it is `finished`."""
    os.makedirs(run_dir, exist_ok=True)
    ckpt = {key: {} for key in checkpoints.RUN_KEYS[kind]}
    ckpt.update(kind=kind, learner="coop", clip="toy", data="toy", classnames=[], backbone="coop", epoch=1,
                finished=finished, gpa_sum=None, best=None,
                args=dict(seed=1, root="data", shots=16, omega_b=0.2, omega_n=1e-6, base_inference="parallel"))
    ckpt = {k: v for k, v in ckpt.items() if k in checkpoints.RUN_KEYS[kind] or k == "kind"}
    torch.save(ckpt, os.path.join(run_dir, "checkpoint.pt"))
    assert checkpoints.read_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["finished"] is finished


@pytest.fixture()
def half_done(tmp_path):
    """seed 1: coop finished, its DPC interrupted, the teacher finished; seed 2: nothing yet."""
    runs = tmp_path / "runs"
    fake_run(runs / "toy" / "coop" / "seed1", True)
    fake_run(runs / "toy" / "coop_dpc" / "seed1", False, "dpc")
    fake_run(runs / "teachers" / "toy" / "seed1", True)
    return tmp_path


def dry_run(tmp, capsys, *more):
    command_line.run_cli(reproduce.main, reproduce.get_args, toy_argv(tmp, "--dry-run", *more))
    out = capsys.readouterr()
    return out.out.strip().splitlines(), out.err


def test_dry_run_lines_are_chains_in_dependency_order(half_done, capsys):
    lines, err = dry_run(half_done, capsys)
    runs, py = half_done / "runs", "python " + REPO
    assert len(lines) == 4
    assert lines[0] == (f"{py}/train_dpc.py --backbone {runs}/toy/coop/seed1 --epochs 1 --workers 0 --shots 4 "
                        f"--output-dir {runs}/toy/coop_dpc/seed1 --resume")      # only the interrupted DPC run
    student, kd_dpc = lines[1].split(" && ")                               # the finished teacher is left out
    assert student.startswith(f"{py}/train_backbone.py --learner promptkd --teacher {runs}/teachers/toy/seed1 ")
    assert student.endswith(f"--output-dir {runs}/toy/promptkd/seed1") and "--clip toy" in student
    assert kd_dpc.startswith(f"{py}/train_dpc.py --backbone {runs}/toy/promptkd/seed1 ")
    coop, coop_dpc = lines[2].split(" && ")
    assert " --seed 2 " in coop and f"--output-dir {runs}/toy/coop/seed2" in coop and "--resume" not in lines[2]
    assert f"--backbone {runs}/toy/coop/seed2 " in coop_dpc
    teacher, student, kd_dpc = lines[3].split(" && ")
    recipe = dict(backbones.PROMPTKD_TEACHER_RECIPE, clip="toy")
    for key, value in recipe.items():
        assert f"--{key.replace('_', '-')} {value} " in teacher
    assert teacher.endswith(f"--epochs 3 --workers 0 --shots 4 --print-every 1 --output-dir {runs}/teachers/toy/seed2")
    assert f"--teacher {runs}/teachers/toy/seed2 " in student and f"--backbone {runs}/toy/promptkd/seed2 " in kd_dpc
    assert "evaluate.py" not in "".join(lines) and "evaluate.py" in err and "teachers" not in err


def test_dry_run_with_dept_adds_a_dept_run_to_each_chain_but_promptkds(half_done, capsys):
    """--dept: each coop chain ends with its + DePT run (train_backbone.py --dept, its own folder and
    --dept-flags); the promptkd chains have none; the table's command names the DePT folders too."""
    lines, err = dry_run(half_done, capsys, *DEPT)
    runs, py = half_done / "runs", "python " + REPO
    assert len(lines) == 4 and [line.count("--dept") for line in lines] == [1, 0, 1, 0]
    for line, seed in ((lines[0], 1), (lines[2], 2)):
        dept = line.split(" && ")[-1]
        assert dept == (f"{py}/train_backbone.py --learner coop --dept --data toy --root {half_done}/data --seed {seed} "
                        f"--clip toy --epochs 1 --batch-size 8 --workers 0 --shots 4 --output-dir {runs}/toy/coop_dept/seed{seed}")
    assert lines[0].split(" && ")[0].endswith("--output-dir " + f"{runs}/toy/coop_dpc/seed1 --resume")   # as without --dept
    table = shlex.split(err.split("the table: ")[1])
    assert table[2:table.index("--out")] == [f"{runs}/toy/{name}/seed{s}" for s in (1, 2) for name in
                                             ("coop", "coop_dpc", "coop_dept", "promptkd", "promptkd_dpc")]
    args = reproduce.get_args(toy_argv(half_done, *DEPT))
    assert vars(reproduce.get_args(reproduce.driver_flags(args))) == vars(args)   # what a Slurm task repeats


def test_slurm_script_has_one_task_per_chain_with_work_left(half_done, capsys):
    """Tasks are chains 0-3 of the plan (all have work left); each runs `reproduce.py --task N` with this
    call's own flags, so its state is decided when it runs."""
    path = half_done / "tab1.sbatch"
    command_line.run_cli(reproduce.main, reproduce.get_args, toy_argv(half_done, "--slurm", str(path)))
    note = capsys.readouterr().out
    script = path.read_text()
    for line in ("--array=0,1,2,3", "--gres=gpu:1", "--requeue", "--signal=B:TERM@120", "--open-mode=append"):
        assert f"#SBATCH {line}\n" in script
    task = re.search(r"^exec (.*) --task \"\$SLURM_ARRAY_TASK_ID\"$", script, re.M).group(1)
    argv = shlex.split(task)
    assert argv[:2] == ["python", os.path.join(REPO, "tools", "reproduce.py")]
    assert vars(reproduce.get_args(argv[2:])) == vars(reproduce.get_args(toy_argv(half_done)))
    assert "--dependency=afterok:$jobid" in script and "evaluate.py" in script and "afterok" in note
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_failed_run_stops_its_chain_only(tmp_path, monkeypatch, capsys):
    """Orchestration without training: the scripts are replaced by a stub that fails for coop stage 1
    and otherwise marks its folder as finished, recording the GPU it was given."""
    os.makedirs(tmp_path / "data" / "mine")
    stub = ("import os, sys; out = sys.argv[sys.argv.index('--output-dir') + 1]\n"
            "if out.endswith(os.path.join('coop', 'seed1')): sys.exit('error: boom')\n"
            "open(os.path.join(out, 'gpu'), 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '-'))")
    monkeypatch.setattr(reproduce, "command", lambda python, argv, resume: [sys.executable, "-c", stub] + argv)
    monkeypatch.setattr(reproduce, "state", lambda d: "finished" if os.path.exists(os.path.join(d, "gpu")) else "run")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    argv = ["--datasets", "mine", "--root", str(tmp_path / "data"), "--seeds", "1", "--learners", "coop,promptkd",
            "--out", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as e:
        command_line.run_cli(reproduce.main, reproduce.get_args, argv)
    out = capsys.readouterr()
    tree = tmp_path / "runs"
    assert e.value.code == 1 and f"failed: {tree}/mine/coop/seed1 (exit 1): error: boom" in out.err
    assert not (tree / "mine" / "coop_dpc" / "seed1").exists()                 # its chain stopped
    gpus = [(tree / d / "seed1" / "gpu").read_text() for d in ("teachers/mine", "mine/promptkd", "mine/promptkd_dpc")]
    assert len(set(gpus)) == 1 and gpus[0] in ("3", "5")                       # the other chain ran, on one GPU


@pytest.mark.parametrize("flags, message", [
    (["--learners", "coop,cocoop"], "--learners: unknown learner 'cocoop' (choose from coop, maple, promptsrc, "),
    (["--datasets", "eurosat,nope"], "--datasets: unknown dataset 'nope'"),
    (["--seeds", "1,two"], "--seeds: 'two' is not a non-negative integer"),
    (["--seeds", "1,-2"], "--seeds: '-2' is not a non-negative integer"),
    (["--seeds", " , "], "--seeds is empty"),
    (["--learners", ""], "--learners is empty"),
    (["--seeds", "1,2,1"], "--seeds lists 1 more than once"),
    (["--dpc-flags", "--output-dir x"], "--dpc-flags: --output-dir is set by this tool"),
    (["--backbone-flags=--res"], "--backbone-flags: --res is set by this tool"),
    (["--teacher-flags", "--epochs '1"], "--teacher-flags: cannot parse"),
    (["--dry-run", "--slurm", "x"], "argument --slurm: not allowed with argument --dry-run"),
    (["--out", "<data>/runs"], "--out <data>/runs and --root <data> overlap"),
    (["--out", "<data>"], "--out <data> and --root <data> overlap"),
])
def test_bad_input_is_one_line(tmp_path, capsys, flags, message):
    flags, message = [f.replace("<data>", str(tmp_path / "data")) for f in flags], \
        message.replace("<data>", str(tmp_path / "data"))
    with pytest.raises(SystemExit) as e:
        command_line.run_cli(reproduce.main, reproduce.get_args, ["--root", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                                                            *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: " + message)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_status_lines_of_concurrent_chains_never_run_together():
    """Chains on several GPUs report from threads; print() writes a line and its newline apart, which
    glued lines together on a pipe (seen: a lost "resume:" line). say() writes each line whole."""
    def chains():
        ts = [threading.Thread(target=lambda t=t: [reproduce.say(f"{t}: x") for _ in range(20000)]) for t in "ab"]
        [t.start() for t in ts]
        [t.join() for t in ts]
    proc = forked.start_call(chains)   # a process of its own: its stdout is a pipe
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    out = out.splitlines()
    assert len(out) == 40000 and set(out) == {"a: x", "b: x"}
