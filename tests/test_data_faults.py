"""Data that is not what the protocol expects, read without a hang, a traceback or a silent surprise:
class folders whose names are not UTF-8 (zips made on Windows), split entries that point outside the
dataset, FIFOs where a file is read, two first runs generating `--data synthetic` at once, an unusable
feature cache (one warning per run), and CoOp's dataset names. CPU only, generated data in tmp_path;
every read that could block on a FIFO runs under an alarm, so a regression fails instead of hanging."""
import argparse
import contextlib
import json
import os
import signal
import time

import pytest
import torch
from PIL import Image

import backbones
import clip_model
import data
import evaluate
import forked
import run_folder
import scoring
import toy_world
import train_backbone
import train_dpc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAFE, NAIVE = b"caf\xe9", b"na\xefve"   # "café" and "naïve" in Windows-1252: not UTF-8


def rename_class(split_dir: str, old: str, new: bytes) -> None:
    os.rename(os.fsencode(os.path.join(split_dir, old)), os.path.join(os.fsencode(split_dir), new))


def save_png(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (10, 120, 200)).save(path)


class Blocked(Exception):
    """Raised by the alarm: a read blocked (on a FIFO). Not an OSError, which zipfile.is_zipfile swallows."""


@contextlib.contextmanager
def no_hang(seconds: float = 5.0):
    """Fail instead of hanging: SIGALRM interrupts an open() blocked on a FIFO and raises Blocked, again
    every second in case something catches it and opens the FIFO once more."""
    def blocked(signum, frame):
        raise Blocked(f"blocked for more than {seconds} s: a FIFO was opened")
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# Class folders whose names are not UTF-8

@pytest.mark.slow
def test_non_utf8_class_folders_train_dpc_and_evaluate_end_to_end(tmp_path, monkeypatch):
    """Both stages and evaluate.py (recomputed, through the feature cache, whose key hashes the paths)
    on a tree with two non-UTF-8 class folders (one base, one new) and no classnames.txt: the prompts
    read the folders' Windows-1252 names, and the checkpoints round-trip them as plain data."""
    root = str(tmp_path / "data")
    folder = toy_world.make_synthetic_imagefolder(root, "synthetic", n_classes=4, n_train=4, n_val=2, n_test=2)
    os.remove(os.path.join(folder, "classnames.txt"))
    for split in ("train", "val", "test"):
        rename_class(os.path.join(folder, split), "class_00", CAFE)    # sorts first: label 0, a base class
        rename_class(os.path.join(folder, split), "class_03", NAIVE)   # sorts last: label 3, a new class
    monkeypatch.chdir(tmp_path)
    cache = ["--feature-cache", str(tmp_path / "cache")]
    common = ["--clip", "tiny", "--epochs", "1", "--workers", "0", "--shots", "2"] + cache
    train_backbone.run(["--learner", "coop", "--data", "synthetic", "--root", root, "--batch-size", "4",
                        "--output-dir", "backbone"] + common)
    train_dpc.run(["--backbone", "backbone", "--output-dir", "dpc"] + common)
    out = evaluate.run(["backbone", "dpc", "--recompute", "--workers", "0", "--out", "evaluation"] + cache)
    assert [r["kind"] for r in out["runs"]] == ["backbone", "dpc"] and all(0 <= r["hm"] <= 100 for r in out["runs"])
    with open(os.path.join("evaluation", "results.json")) as f:
        assert len(json.load(f)["runs"]) == 2
    for run in ("backbone", "dpc"):
        ckpt = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=True)
        assert ckpt["classnames"] == ["café", "class_01"]    # the base classes
    splits = data.load_splits("synthetic", root, 2, 1)
    assert data.classnames_of(splits["new"]["test"]) == ["class_02", "naïve"]
    assert all(os.path.isfile(it.path) for it in splits["all"]["test"])   # paths keep the names on disk


def test_readable_name_of_a_folder_name_that_is_not_utf8():
    readable = data.readable_name
    assert readable("class_01") == "class_01" and readable("tenché") == "tenché"
    assert readable(os.fsdecode(CAFE)) == "café" and readable(os.fsdecode(NAIVE)) == "naïve"
    # valid UTF-8 stays UTF-8 beside a stray byte; a byte cp1252 leaves undefined and a lone surrogate
    # from a JSON "\ud800" become U+FFFD: every class name can be tokenized
    assert readable(os.fsdecode("naïve ".encode() + b"caf\xe9\x81")) == "naïve café\ufffd"
    assert readable("x\ud800") == "x\ufffd"


def test_classnames_txt_names_a_non_utf8_folder_by_its_readable_name(tmp_path):
    folder = toy_world.make_synthetic_imagefolder(str(tmp_path), "mine", n_classes=3, n_train=1, n_val=0, n_test=1)
    for split in ("train", "test"):
        rename_class(os.path.join(folder, split), "class_00", CAFE)
    with open(os.path.join(folder, "classnames.txt"), "w", encoding="utf-8") as f:
        f.write("café Café au lait\nclass_01 red stripes\nclass_02 green stripes\n")
    splits = data.read_splits(str(tmp_path), "mine")
    assert data.classnames_of(splits["train"]) == ["Café au lait", "red stripes", "green stripes"]
    assert os.path.isfile(splits["test"][0].path) and os.fsencode(splits["test"][0].path).endswith(b"/caf\xe9/0.png")
    with open(os.path.join(folder, "classnames.txt"), "w", encoding="utf-8") as f:
        f.write("class_01 red stripes\nclass_02 green stripes\n")
    with pytest.raises(data.DataError, match="classnames.txt has no line for class folder.s. café;"):
        data.read_splits(str(tmp_path), "mine")


def test_split_json_class_names_with_escaped_bytes_become_text(tmp_path):
    """A split file written by Python's json from a non-UTF-8 tree holds "caf\\udce9": the path still
    opens the file, the class name is text the tokenizer takes."""
    folder = tmp_path / "dtd"
    for name in (CAFE, b"lace"):
        save_png(os.fsdecode(os.path.join(os.fsencode(folder / "images"), name, b"0.jpg")))
    entries = [[os.fsdecode(CAFE + b"/0.jpg"), 0, os.fsdecode(CAFE)], ["lace/0.jpg", 1, "lace"]]
    with open(folder / "split_zhou_DescribableTextures.json", "w") as f:
        json.dump({"train": entries, "val": entries, "test": entries}, f)
    splits = data.read_splits(str(tmp_path), "dtd")
    assert data.classnames_of(splits["train"]) == ["café", "lace"]
    assert os.path.isfile(splits["train"][0].path)
    clip_model.tokenize(data.classnames_of(splits["train"]))


def test_errors_and_log_lines_naming_a_non_utf8_path_print_anywhere(tmp_path, monkeypatch, capsys):
    """The one error line of a run (run_cli), and log() on the terminal and in log.txt, escape what an
    encoding cannot take, instead of a UnicodeEncodeError inside the error handler."""
    folder = toy_world.make_synthetic_imagefolder(str(tmp_path / "data"), "synthetic", n_classes=4, n_train=2,
                                                  n_val=0, n_test=1)
    os.remove(os.path.join(folder, "classnames.txt"))
    for split in ("train", "test"):   # a class folder without images
        os.makedirs(os.path.join(os.fsencode(folder), split.encode(), CAFE))
    empty = os.path.join(folder, "train", os.fsdecode(CAFE))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train_backbone.run(["--learner", "coop", "--data", "synthetic", "--root", str(tmp_path / "data"), "--clip",
                            "tiny", "--workers", "0", "--output-dir", "run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: class folder {folder}/train/caf\\udce9 has no images (.jpg/.jpeg/.png/" \
                                        f".bmp/.gif/.tif/.tiff/.webp); add images or delete the folder\n"
    with open(tmp_path / "log.txt", "w", encoding="utf-8") as log_file:
        monkeypatch.setattr(run_folder, "_LOG", log_file)
        run_folder.log(f"reading {empty}")
    assert "caf\\udce9" in capsys.readouterr().out and "caf\\udce9" in (tmp_path / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------
# Split entries outside the dataset folder

def write_split(folder, split_file: str, bad_split: str, entry: str) -> None:
    """A split file whose `bad_split` lists `entry` second (label 1); every other entry is an image."""
    good = [["img0.jpg", 0, "c0"], ["img1.jpg", 1, "c1"]]
    raw = {s: [good[0], [entry, 1, "c1"]] if s == bad_split else good for s in ("train", "val", "test")}
    with open(os.path.join(folder, split_file), "w") as f:
        json.dump(raw, f)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_entries_outside_the_dataset_folder_are_refused(tmp_path, split):
    """Stanford Cars' paths are relative to its dataset folder itself: '..' inside it is read, an
    absolute path or '..' out of it is one error naming the file, split, entry and fix."""
    folder = tmp_path / "stanford_cars"
    for name in ("img0.jpg", "img1.jpg"):
        save_png(str(folder / name))
    (folder / "a").mkdir()
    write_split(folder, "split_zhou_StanfordCars.json", split, "a/../img1.jpg")
    assert data.read_splits(str(tmp_path), "stanford_cars")[split][1].path == str(folder / "a/../img1.jpg")
    for entry in ("/etc/passwd", "../../etc/passwd", "a/../../x.jpg"):
        write_split(folder, "split_zhou_StanfordCars.json", split, entry)
        with pytest.raises(data.DataError) as e:
            data.read_splits(str(tmp_path), "stanford_cars")
        assert str(e.value).startswith(f"split_zhou_StanfordCars.json: entry 1 of '{split}' is {entry!r}, outside "
                                       f"the dataset folder {folder}")
        assert "re-download" in str(e.value) and "\n" not in str(e.value)


def test_split_entries_may_climb_within_the_dataset_folder(tmp_path):
    """EuroSAT's paths are relative to 2750/: '../extra/img1.jpg' stays inside eurosat/, '../../x' leaves it."""
    folder = tmp_path / "eurosat"
    save_png(str(folder / "2750" / "img0.jpg"))
    save_png(str(folder / "extra" / "img1.jpg"))
    write_split(folder, "split_zhou_EuroSAT.json", "test", "../extra/img1.jpg")
    assert len(data.read_splits(str(tmp_path), "eurosat")["test"]) == 2
    write_split(folder, "split_zhou_EuroSAT.json", "test", "../../x.jpg")
    with pytest.raises(data.DataError, match=r"entry 1 of 'test' is '\.\./\.\./x\.jpg', outside the dataset folder"):
        data.read_splits(str(tmp_path), "eurosat")


def write_aircraft(folder, val_lines: str) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "variants.txt").write_text("707-320\nA300B4\n")
    for split in ("train", "test"):
        (folder / f"images_variant_{split}.txt").write_text("0001 707-320\n0002 A300B4\n")
    (folder / "images_variant_val.txt").write_text(val_lines)


def test_aircraft_image_ids_outside_the_dataset_folder_are_refused(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    write_aircraft(folder, "0001 707-320\n../../../etc/passwd A300B4\n")
    with pytest.raises(data.DataError, match=r"images_variant_val.txt: line 2 of 'val' names image "
                                             r"'\.\./\.\./\.\./etc/passwd', outside the dataset folder"):
        data.read_splits(str(tmp_path), "fgvc_aircraft")


# ---------------------------------------------------------------------------------------------
# FIFOs where a file is read: one clear error, never a hang

def fifo_split_json(root):
    (root / "eurosat" / "2750").mkdir(parents=True)
    return root / "eurosat" / "split_zhou_EuroSAT.json", "eurosat"


def fifo_classnames_txt(root):
    toy_world.make_synthetic_imagefolder(str(root), "mine", n_classes=2, n_train=1, n_val=0, n_test=1)
    os.remove(root / "mine" / "classnames.txt")
    return root / "mine" / "classnames.txt", "mine"


def fifo_variants_txt(root):
    write_aircraft(root / "fgvc_aircraft", "0001 707-320\n")
    os.remove(root / "fgvc_aircraft" / "variants.txt")
    return root / "fgvc_aircraft" / "variants.txt", "fgvc_aircraft"


def fifo_aircraft_list(root):
    write_aircraft(root / "fgvc_aircraft", "")
    os.remove(root / "fgvc_aircraft" / "images_variant_val.txt")
    return root / "fgvc_aircraft" / "images_variant_val.txt", "fgvc_aircraft"


def fifo_imagenet_classnames(root):
    for split in ("train", "val"):
        for wnid in ("n01", "n02"):
            save_png(str(root / "imagenet" / "images" / split / wnid / "x.JPEG"))
    return root / "imagenet" / "classnames.txt", "imagenet"


def fifo_cross_domain_classnames(root):
    for label in ("0", "1"):
        save_png(str(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / label / "x.png"))
    return root / "imagenetv2" / "classnames.txt", "imagenet_v2"


@pytest.mark.parametrize("make", [fifo_split_json, fifo_classnames_txt, fifo_variants_txt, fifo_aircraft_list,
                                  fifo_imagenet_classnames, fifo_cross_domain_classnames],
                         ids=lambda f: f.__name__[len("fifo_"):])
def test_a_fifo_where_a_dataset_file_is_read_is_one_error(tmp_path, make):
    fifo, dataset = make(tmp_path)
    os.mkfifo(fifo)
    with no_hang(), pytest.raises(data.DataError) as e:
        data.read_splits(str(tmp_path), dataset)
    assert str(e.value) == f"{fifo} is a FIFO (named pipe), not a regular file: put the file itself there"


def test_a_fifo_where_clip_weights_are_read_is_one_error(tmp_path, monkeypatch, capsys):
    fifo = tmp_path / "ViT-B-16.pt"
    os.mkfifo(fifo)
    expected = f"CLIP weights {fifo} are a FIFO (named pipe), not a regular file: put the .pt file itself there"
    with no_hang():
        with pytest.raises(clip_model.CLIPLoadError) as e:
            clip_model.read_state_dict(str(fifo))
        assert str(e.value) == expected
        monkeypatch.setattr(clip_model, "CACHE_DIR", str(tmp_path))   # found by name in ~/.cache/clip
        with pytest.raises(clip_model.CLIPLoadError) as e:
            clip_model.load("ViT-B/16")
        assert str(e.value) == expected
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as e:   # --clip PATH
            train_backbone.run(["--learner", "coop", "--data", "synthetic", "--root", str(tmp_path / "data"),
                                "--clip", str(fifo), "--workers", "0", "--output-dir", "run"])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {expected}\n"


# ---------------------------------------------------------------------------------------------
# --data synthetic: generated aside and renamed

@pytest.mark.slow
def test_two_first_synthetic_runs_at_once_both_read_the_whole_tree(tmp_path):
    """Two processes: the second waits until <root>/synthetic appears and reads it at once, as a run
    started a moment after the first one would. Both read the whole tree (10 classes x 28 images)."""
    root, ready = str(tmp_path / "data"), str(tmp_path / "ready")

    def read():
        print(sum(map(len, data.load_splits("synthetic", root, 1, 1)["unsampled"].values())))

    def wait_for(exists, path):
        deadline = time.time() + 60
        while not exists(path) and time.time() < deadline:
            time.sleep(0.001)

    def first():
        wait_for(os.path.exists, ready)
        read()

    def second():
        open(ready, "w").close()
        wait_for(os.path.isdir, os.path.join(root, "synthetic"))
        read()
    procs = [forked.start_call(target) for target in (first, second)]   # processes of their own
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.strip().splitlines()[-1:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["280", "280"]


def test_synthetic_tree_is_never_visible_half_written(tmp_path, monkeypatch):
    """While images are written, <root>/synthetic does not exist; a second generation (the process that
    finishes second) keeps the first copy untouched and leaves no temp folder."""
    out, seen = tmp_path / "synthetic", []
    real_save = Image.Image.save

    def save(image, path, *args, **kwargs):
        seen.append(out.exists())
        return real_save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    toy_world.make_synthetic_imagefolder(str(tmp_path), n_classes=2, n_train=2, n_val=1, n_test=1)
    assert len(seen) == 8 and not any(seen)
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    time.sleep(0.01)
    assert toy_world.make_synthetic_imagefolder(str(tmp_path), n_classes=2, n_train=2, n_val=1, n_test=1) == str(out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == first
    assert sorted(os.listdir(tmp_path)) == ["synthetic"]


# ---------------------------------------------------------------------------------------------
# An unusable feature cache: one warning per run

@pytest.mark.slow
def test_an_unusable_feature_cache_warns_once_per_run(tmp_path, monkeypatch, capsys):
    """A run scores base and new test images, each a failed cache write: one warning line, on the
    terminal and in log.txt (docs/faults.md). The cache is a file where its folder should be:
    a read-only folder would be the same failure, but chmod does not restrict root (CI)."""
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    for seed in ("1", "2"):   # two runs in one process: each warns
        scoring._MEMO.clear()   # as in a new process: the features of the first run would be a hit in memory
        train_backbone.run(["--learner", "coop", "--data", "synthetic", "--root", str(tmp_path / "data"), "--clip",
                            "tiny", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--shots", "1",
                            "--seed", seed, "--feature-cache", str(cache), "--output-dir", f"run{seed}"])
        out = capsys.readouterr().out
        assert out.count("warning: cannot write the feature cache") == 1, out
        assert (tmp_path / f"run{seed}" / "log.txt").read_text().count("warning: cannot write the feature cache") == 1


# ---------------------------------------------------------------------------------------------
# CoOp's dataset names

COOP_CONFIG_NAMES = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                     "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch",
                     "imagenet_a", "imagenet_r")   # CoOp's configs/datasets/<name>.yaml


def test_coop_dataset_names_read_the_datasets_they_name(tmp_path):
    assert {data.dataset_name(n) for n in COOP_CONFIG_NAMES} == set(data.DATASETS)
    assert data.dataset_name("imagenetv2") == "imagenet_v2" and data.dataset_name("mine") == "mine"
    image_dir = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    (tmp_path / "imagenetv2").mkdir()
    (tmp_path / "imagenetv2" / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    for label in ("0", "1"):
        save_png(str(image_dir / label / "a.png"))
    splits = data.read_splits(str(tmp_path), "imagenetv2")
    assert splits == data.read_splits(str(tmp_path), "imagenet_v2")
    assert data.classnames_of(splits["test"]) == ["tench", "goldfish"] and splits["val"] == []
    assert data.load_splits("imagenetv2", str(tmp_path), 0, 1)["all"] == splits


def test_every_script_records_our_name_for_a_coop_name(monkeypatch):
    """--data / --target imagenetv2: runs record imagenet_v2 (train_dpc.py: also for a Dassl backbone, which
    records no dataset of its own), and a target counts as cross-domain."""
    import evaluate
    import train_backbone
    import train_dpc
    assert train_backbone.get_args(["--learner", "coop", "--data", "imagenetv2"]).data == "imagenet_v2"
    learner = argparse.Namespace(clip=backbones.load_clip("tiny", "cpu"))   # all dpc_stage1 reads of it: its CLIP
    monkeypatch.setattr(backbones, "load_stage1", lambda *a: (learner, dict(learner="coop", clip="tiny", data=None, args={})))
    args = train_dpc.get_args(["--backbone", "dassl_run", "--data", "imagenetv2"])
    _, _, inherited = backbones.dpc_stage1(args)
    assert inherited["data"] == "imagenet_v2"
    assert evaluate.parse_targets("imagenetv2,eurosat", {"imagenet"}) == ["imagenet", "imagenet_v2", "eurosat"]
    assert evaluate.parse_targets("imagenetv2,cross-domain", set()) == list(data.CROSS_DOMAIN)
