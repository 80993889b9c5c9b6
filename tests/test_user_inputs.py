"""What users hand the scripts (docs/faults.md): a zip that inflates to gigabytes, a closed stdout,
a missing optional package, seed runs of different experiments, a full disk, a Slurm log path with a space,
temp files of writers on several hosts, and the import tool's own message. One test (or two) per case."""
import argparse
import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import backbones
import checkpoints
import clip_model
import command_line
import evaluate
import run_folder
import scoring
import train_backbone as tb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import reproduce  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished 1-epoch CoOp run on synthetic data."""
    base = tmp_path_factory.mktemp("inputs")
    with contextlib.chdir(base):
        tb.main(tb.get_args(["--learner", "coop", "--data", "synthetic", "--root", str(base / "data"), "--clip", "tiny",
                             "--epochs", "1", "--shots", "2", "--workers", "0", "--output-dir", "runs/coop/seed1"]))
    return base


def one_error(capsys, fn, argv):
    with pytest.raises(SystemExit) as exit_:
        fn(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


# -- 1. a zip that inflates to gigabytes ------------------------------------------------------------------

def deflate_bomb(path, names=("archive/data.pkl", "archive/constants.pkl"), inflated=256 << 20):
    """A small file shaped like OpenAI's TorchScript archive whose first entry is DEFLATE-compressed zeros."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo(names[0])
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(inflated >> 20):
                f.write(block)
        z.writestr(names[1], b"")
    return path


@pytest.mark.slow
def test_a_compressed_clip_archive_is_refused_before_it_is_inflated(tmp_path, capsys):
    bomb = deflate_bomb(tmp_path / "ViT-B-16.pt")
    assert os.path.getsize(bomb) < 2 << 20
    err = one_error(capsys, tb.run, ["--learner", "coop", "--data", "synthetic", "--root", str(tmp_path / "data"),
                                     "--clip", str(bomb), "--workers", "0", "--output-dir", str(tmp_path / "out")])
    assert "refusing to read CLIP weights" in err and "is compressed" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_refusing_the_bomb_keeps_memory_near_the_file_size(tmp_path):
    """Peak memory (RSS) of the reader while it refuses a 1 GB-inflating file of ~1 MB: a few MB."""
    bomb = deflate_bomb(tmp_path / "bomb.pt", inflated=1 << 30)
    code = ("import resource, clip_model\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    clip_model.read_state_dict({str(bomb)!r})\nexcept clip_model.CLIPLoadError as e:\n    print(e)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert "is compressed" in lines[0], out
    assert int(lines[-1]) < 32, f"peak RSS grew by {lines[-1]} MB while refusing"   # MB


@pytest.mark.slow
def test_every_zip_the_project_opens_is_checked_first(run, tmp_path):
    """A checkpoint (or Dassl file) re-zipped with compression is refused; a compressed feature-cache file is a
    miss, never read."""
    ckpt = run / "runs" / "coop" / "seed1" / "checkpoint.pt"
    squeezed = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(ckpt) as src, zipfile.ZipFile(squeezed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item.filename))
    assert torch.load(squeezed, weights_only=True)["kind"] == "backbone"   # torch itself would read it
    with pytest.raises(run_folder.RunError, match="is compressed"):
        checkpoints.load_safely(str(squeezed))
    assert clip_model.zip_problem(str(ckpt)) is None
    lying = tmp_path / "lying.pt"                # a stored entry that claims more than the file holds
    data = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(ckpt) as z:
        first = z.infolist()[0]
    # the size fields of the central directory entry of the first member
    at = data.rfind(b"PK\x01\x02" + data[data.find(b"PK\x01\x02") + 4:data.find(b"PK\x01\x02") + 8])
    data[at + 20:at + 24] = (first.compress_size + 10 ** 8).to_bytes(4, "little")
    data[at + 24:at + 28] = (first.file_size + 10 ** 8).to_bytes(4, "little")
    lying.write_bytes(bytes(data))
    assert "declares" in (clip_model.zip_problem(str(lying)) or "")


# -- 2. a closed stdout ---------------------------------------------------------------------------------

def piped(cmd, cwd):
    """`cmd | head -1`, returning (cmd's exit code, its stderr)."""
    shell = f"set -o pipefail; {' '.join(map(shlex.quote, cmd))} 2> err.txt | head -1 > /dev/null; echo $?"
    rc = subprocess.run(["bash", "-c", shell], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    return int(rc.stdout.strip().splitlines()[-1]), (cwd / "err.txt").read_text()


@pytest.mark.slow
def test_a_closed_stdout_costs_the_view_not_the_record(run, tmp_path):
    """`| head -1` on each stage, each a fresh `python` (the interpreter's own exit on a closed pipe is the
    point): the run finishes and keeps its record."""
    rc, err = piped([sys.executable, os.path.join(REPO, "evaluate.py"), str(run / "runs"), "--workers", "0",
                     "--out", str(tmp_path / "ev")], tmp_path)
    assert rc == 0 and "Traceback" not in err and "Broken pipe" not in err, err
    assert (tmp_path / "ev" / "results.json").is_file() and (tmp_path / "ev" / "table.md").is_file()
    rc, err = piped([sys.executable, os.path.join(REPO, "train_backbone.py"), "--learner", "coop", "--data", "synthetic",
                     "--root", str(run / "data"), "--clip", "tiny", "--epochs", "3", "--shots", "2", "--batch-size", "4",
                     "--print-every", "1", "--workers", "0", "--output-dir", str(tmp_path / "train")], tmp_path)
    assert rc == 0 and "Traceback" not in err, err
    assert checkpoints.read_checkpoint(str(tmp_path / "train" / "checkpoint.pt"))["finished"]
    log = (tmp_path / "train" / "log.txt").read_text()
    assert "epoch 3/3" in log and "* accuracy:" in log
    rc, err = piped([sys.executable, os.path.join(REPO, "train_dpc.py"), "--backbone", str(tmp_path / "train"),
                     "--epochs", "2", "--shots", "2", "--print-every", "1", "--workers", "0", "--output-dir",
                     str(tmp_path / "dpc")], tmp_path)
    assert rc == 0 and "Traceback" not in err, err
    assert checkpoints.read_checkpoint(str(tmp_path / "dpc" / "checkpoint.pt"))["finished"]
    assert "epoch 2/2" in (tmp_path / "dpc" / "log.txt").read_text()


# -- 3. a missing optional package ------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--figures", "--interpret"])
def test_figures_without_matplotlib_is_one_line_before_any_work(run, tmp_path, capsys, monkeypatch, flag):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # `import matplotlib` now raises ImportError
    err = one_error(capsys, evaluate.run, [str(run / "runs"), flag, "--workers", "0", "--out", str(tmp_path / "ev")])
    assert "matplotlib" in err and "pip install matplotlib" in err, err
    assert not (tmp_path / "ev").exists()


# -- 4. seeds of different experiments --------------------------------------------------------------------

def seed_copy(run, seed, **args):
    """The run copied as another seed's run, with some of its recorded settings changed."""
    src = run / "runs" / "coop" / "seed1"
    dst = run / "runs" / "coop" / f"seed{seed}"
    if seed != 1:   # seed 1: edited in place
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    ckpt = torch.load(dst / "checkpoint.pt", weights_only=True)
    ckpt["args"] = dict(ckpt["args"], seed=seed, **{k: v for k, v in args.items() if k != "clip"})
    ckpt["clip"] = args.get("clip", ckpt["clip"])
    if "clip" in args:   # what a run on these weights records (train_backbone.py)
        ckpt["args"]["clip_digest"] = scoring.clip_digest(backbones.load_clip(args["clip"], "cpu"))
    torch.save(ckpt, dst / "checkpoint.pt")
    return dst


@pytest.mark.parametrize("setting, value", [("lr", 0.01), ("shots", 4), ("epochs", 2), ("ctx_init", ""),
                                            ("n_ctx", 8), ("subsample", "all")])
def test_seeds_trained_with_other_settings_are_never_averaged(run, capsys, tmp_path, setting, value):
    extra = seed_copy(run, 2, **{setting: value})
    try:
        err = one_error(capsys, evaluate.run, [str(run / "runs"), "--workers", "0", "--out", str(tmp_path / "ev")])
        stored = torch.load(run / "runs" / "coop" / "seed1" / "checkpoint.pt", weights_only=True)["args"][setting]
        assert f"--{setting.replace('_', '-')} {stored!r} vs {value!r}" in err and "in their own call" in err, err
    finally:
        shutil.rmtree(extra)


@pytest.mark.slow
def test_the_clip_is_compared_by_content(run, capsys, tmp_path):
    recorded = torch.load(run / "runs" / "coop" / "seed1" / "checkpoint.pt", weights_only=True)["args"]["clip_digest"]
    assert recorded == scoring.clip_digest(backbones.load_clip("tiny", "cpu"))
    weights = clip_model.random_clip("tiny", seed=0).state_dict()
    torch.save(weights, tmp_path / "a.pt")
    shutil.copy(tmp_path / "a.pt", tmp_path / "copy_of_a.pt")
    torch.save(clip_model.random_clip("tiny", seed=1).state_dict(), tmp_path / "other.pt")
    seed_copy(run, 1, clip=str(tmp_path / "a.pt"))
    extra = seed_copy(run, 2, clip=str(tmp_path / "copy_of_a.pt"))
    try:
        evaluate.main(evaluate.get_args([str(run / "runs"), "--workers", "0", "--out", str(tmp_path / "same")]))
        seed_copy(run, 2, clip=str(tmp_path / "other.pt"))
        err = one_error(capsys, evaluate.run, [str(run / "runs"), "--workers", "0", "--out", str(tmp_path / "ev")])
        assert "--clip" in err and "other weights" in err, err
        seed_copy(run, 2, clip=str(tmp_path / "a.pt"))
        ckpt = torch.load(extra / "checkpoint.pt", weights_only=True)
        torch.save(dict(ckpt, args=dict(ckpt["args"], seed=1)), extra / "checkpoint.pt")   # the same seed twice
        err = one_error(capsys, evaluate.run, [str(run / "runs"), "--workers", "0", "--out", str(tmp_path / "ev2")])
        assert "seed 1 comes twice" in err, err
    finally:
        shutil.rmtree(extra)
        seed_copy(run, 1, clip="tiny")


# -- 5. a full disk ---------------------------------------------------------------------------------------

def test_a_full_disk_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    run_folder.save_atomic({"epoch": 1}, str(path))
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4048")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 10, 10 ** 10 - 300_000, 300_000))
    with pytest.raises(OSError) as e:
        run_folder.save_atomic({"epoch": 2}, str(path))
    message = command_line.one_line(e.value)
    assert "no space left on device: 0.3 MB free in" in message and str(path) in message, message
    assert "enforce fail" not in message and path.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# -- 6. a Slurm log path with a space ---------------------------------------------------------------------

def test_the_slurm_output_path_survives_a_space(tmp_path):
    logs = str(tmp_path / "my runs" / "logs")
    script = tmp_path / "job.sbatch"
    reproduce.write_slurm(str(script), [0, 1], "python tools/reproduce.py --datasets toy", "python evaluate.py x", logs)
    (line,) = [l for l in script.read_text().splitlines() if l.startswith("#SBATCH --output=")]
    assert shlex.split(line[len("#SBATCH "):]) == [f"--output={logs}/%A_%a.out"]
    with pytest.raises(run_folder.RunError, match="double quote"):
        reproduce.write_slurm(str(script), [0], "x", "y", str(tmp_path / 'a"b'))


# -- 7. temp files of several hosts; stale ones; the import tool's message --------------------------------

def test_temp_names_carry_host_pid_and_a_random_part(tmp_path):
    a, b = run_folder.temp_name(str(tmp_path / "f.pt")), run_folder.temp_name(str(tmp_path / "f.pt"))
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
    assert a != b and f".{host}.{os.getpid()}." in a and run_folder.TEMP_NAME.fullmatch(os.path.basename(a))


@pytest.mark.slow
def test_stale_cache_temporaries_are_cleaned_when_the_cache_is_written(run, tmp_path):
    import data
    learner = backbones.load_backbone(str(run / "runs" / "coop" / "seed1"), "cpu")[0]
    items = data.load_splits("synthetic", str(run / "data"), 2, 1)["base"]["test"]
    key, _ = scoring.feature_key(learner, items, "cpu", 100)
    folder = tmp_path / "cache" / key[:2]
    folder.mkdir(parents=True)
    stale, fresh, other = (folder / f"{key}.pt.node7.{n}.0badcafe.tmp" for n in (1, 2, 3))
    for f in (stale, fresh, other):
        f.write_bytes(b"x")
    other.rename(folder / "notes.txt")
    os.utime(stale, (time.time() - 3 * 86400,) * 2)
    scoring._MEMO.clear()
    scoring.accuracy(learner, items, data.classnames_of(items), "cpu", cache=str(tmp_path / "cache"))
    assert not stale.exists() and fresh.exists() and (folder / "notes.txt").exists() and (folder / f"{key}.pt").exists()


def test_the_import_tool_never_suggests_a_resume_it_does_not_have(run, tmp_path):
    folder = tmp_path / "unfinished"
    shutil.copytree(run / "runs" / "coop" / "seed1", folder)
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    torch.save(dict(ckpt, finished=False), folder / "checkpoint.pt")
    args = argparse.Namespace(output_dir=str(folder), overwrite=False, resume=None, trust_checkpoint=False)
    with pytest.raises(run_folder.RunError) as e:
        command_line.check_run_folder(args)
    run_folder.release_run_folder()
    assert "--overwrite" in str(e.value) and "--resume" not in str(e.value)
