"""Tests for data.py: CoOp-protocol few-shot/base-new splits, the three on-disk layouts, clear errors,
odd image modes and transforms. CPU only, synthetic data in tmp_path."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data import (CLIP_MEAN, CLIP_STD, DATASETS, DataError, ImageDataset, Item, classnames_of, few_shot,
                  load_image, read_splits, subsample, test_transform,
                  train_transform)
from toy_world import make_synthetic_imagefolder


def fake_items(counts: dict[int, int], interleave: bool = True) -> list[Item]:
    """Items with `counts[label]` images per label; interleaved so first-appearance order matters."""
    per_label = {c: [Item(f"img/{c}/{i}.jpg", c, f"class{c}") for i in range(n)] for c, n in counts.items()}
    if not interleave:
        return [it for group in per_label.values() for it in group]
    out = []
    for i in range(max(counts.values())):
        out.extend(group[i] for group in per_label.values() if i < len(group))
    return out


def save_rgb(path: str, colour=(120, 60, 200), size: int = 8) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


# ---------------------------------------------------------------------------------------------
# few_shot

def test_few_shot_is_deterministic_per_seed():
    train, val = fake_items({3: 30, 0: 30, 7: 30}), fake_items({3: 10, 0: 10, 7: 10})
    assert few_shot(train, val, 16, seed=1) == few_shot(train, val, 16, seed=1)
    assert few_shot(train, val, 16, seed=1) != few_shot(train, val, 16, seed=2)


def test_few_shot_replays_dassl_random_sample():
    """Same draws as Dassl: global random.seed, random.sample per label in first-appearance order,
    train first, then val (K_val = min(K, 4)) continuing the same stream."""
    train = fake_items({5: 20, 2: 17, 9: 40, 0: 16})
    val = fake_items({5: 9, 2: 6, 9: 3, 0: 8})
    for seed in (1, 2, 3):
        random.seed(seed)
        expected_train, expected_val = [], []
        for label in (5, 2, 9, 0):  # order of first appearance, not sorted
            expected_train += random.sample([it for it in train if it.label == label], 16)
        for label in (5, 2, 9, 0):
            group = [it for it in val if it.label == label]
            expected_val += random.sample(group, 4) if len(group) >= 4 else group
        assert few_shot(train, val, 16, seed) == (expected_train, expected_val)


def test_few_shot_small_classes_and_val_shots():
    train, val = fake_items({0: 3, 1: 20, 2: 16}), fake_items({0: 2, 1: 10, 2: 10})
    new_train, new_val = few_shot(train, val, 16, seed=1)
    count = lambda items, c: sum(it.label == c for it in items)  # noqa: E731
    assert [count(new_train, c) for c in range(3)] == [3, 16, 16]  # class 0 taken whole, no repeats
    assert [count(new_val, c) for c in range(3)] == [2, 4, 4]
    assert len(set(new_train)) == len(new_train)
    assert few_shot(train, val, 2, seed=1)[1] == few_shot(train, val, 2, seed=1)[1]
    assert [count(few_shot(train, val, 2, seed=1)[1], c) for c in range(3)] == [2, 2, 2]


def test_few_shot_zero_returns_everything():
    train, val = fake_items({0: 5, 1: 5}), fake_items({0: 2, 1: 2})
    assert few_shot(train, val, 0, seed=1) == (train, val)
    assert few_shot(train, [], 4, seed=1)[1] == []  # ImageNet has no val


# ---------------------------------------------------------------------------------------------
# subsample

@pytest.mark.parametrize("n", [10, 37, 47, 101, 397])
def test_subsample_base_new_counts(n):
    splits = {k: fake_items({c: 2 for c in range(n)}, interleave=False) for k in ("train", "val", "test")}
    base, new = subsample(splits, "base"), subsample(splits, "new")
    m = math.ceil(n / 2)
    for k in ("train", "val", "test"):
        assert sorted({it.label for it in base[k]}) == list(range(m))
        assert sorted({it.label for it in new[k]}) == list(range(n - m))
        assert len(base[k]) + len(new[k]) == len(splits[k])
    assert classnames_of(base["train"]) == [f"class{c}" for c in range(m)]
    assert classnames_of(new["train"]) == [f"class{c}" for c in range(m, n)]


def test_subsample_relabels_and_keeps_paths():
    splits = {"train": fake_items({c: 1 for c in range(5)}), "val": [], "test": fake_items({4: 1, 1: 1})}
    new = subsample(splits, "new")  # labels 0..4 -> base {0,1,2}, new {3,4} -> {0,1}
    assert new["train"] == [Item("img/3/0.jpg", 0, "class3"), Item("img/4/0.jpg", 1, "class4")]
    assert new["test"] == [Item("img/4/0.jpg", 1, "class4")]
    assert new["val"] == []
    assert subsample(splits, "all") == splits
    with pytest.raises(DataError, match="base, new, all"):
        subsample(splits, "novel")


def test_classnames_of_rejects_gaps():
    with pytest.raises(DataError, match="0..n-1"):
        classnames_of([Item("a", 0, "a"), Item("b", 2, "b")])


# ---------------------------------------------------------------------------------------------
# Reading the three layouts

def test_imagefolder_from_synthetic(tmp_path):
    folder = make_synthetic_imagefolder(str(tmp_path), n_classes=12, n_train=3, n_val=2, n_test=2)
    assert folder == str(tmp_path / "synthetic")
    splits = read_splits(str(tmp_path), "synthetic")
    assert [len(splits[k]) for k in ("train", "val", "test")] == [36, 24, 24]
    names = classnames_of(splits["train"])
    assert names[0] == "red stripes" and names[11] == "navy stripes" and len(set(names)) == 12
    for it in splits["test"]:  # labels follow sorted folder names, class_00 .. class_11
        assert os.path.basename(os.path.dirname(it.path)) == f"class_{it.label:02d}"
        assert os.path.isfile(it.path)


def test_imagefolder_without_val_or_classnames(tmp_path):
    make_synthetic_imagefolder(str(tmp_path), "mine", n_classes=3, n_train=2, n_val=0, n_test=1)
    os.remove(tmp_path / "mine" / "classnames.txt")
    splits = read_splits(str(tmp_path), "mine")
    assert splits["val"] == []
    assert classnames_of(splits["train"]) == ["class_00", "class_01", "class_02"]


def test_synthetic_is_deterministic(tmp_path):
    a = make_synthetic_imagefolder(str(tmp_path / "a"), n_classes=2, n_train=2, n_val=0, n_test=1, seed=3)
    b = make_synthetic_imagefolder(str(tmp_path / "b"), n_classes=2, n_train=2, n_val=0, n_test=1, seed=3)
    for folder in (a, b):
        assert sorted(os.listdir(os.path.join(folder, "train"))) == ["class_00", "class_01"]
    pixels = [load_image(os.path.join(folder, "train/class_01/1.png")) for folder in (a, b)]
    assert np.array_equal(np.asarray(pixels[0]), np.asarray(pixels[1]))


def test_split_json_eurosat(tmp_path):
    image_dir = tmp_path / "eurosat" / "2750"
    entries = {"train": [["Forest/Forest_1.jpg", 1, "Forest"], ["River/River_1.jpg", 0, "River"],
                         ["Forest/Forest_2.jpg", 1, "Forest"]],
               "val": [["River/River_2.jpg", 0, "River"]],
               "test": [["River/River_3.jpg", 0, "River"], ["Forest/Forest_3.jpg", 1, "Forest"]]}
    for split in entries.values():
        for rel, _, _ in split:
            save_rgb(str(image_dir / rel))
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(entries))
    splits = read_splits(str(tmp_path), "eurosat")
    assert splits["train"][0] == Item(str(image_dir / "Forest/Forest_1.jpg"), 1, "Forest")
    assert [it.label for it in splits["train"]] == [1, 0, 1]  # file order kept: few_shot depends on it
    assert classnames_of(splits["train"]) == ["River", "Forest"]
    assert len(splits["val"]) == 1 and len(splits["test"]) == 2


def test_fgvc_aircraft_txt(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A340-500", "Cessna 172"]
    folder.mkdir()
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = {"train": ["0001 Cessna 172", "0002 707-320", "0003 A340-500"],
             "val": ["0004 707-320"], "test": ["0005 A340-500", "0006 Cessna 172", "0007 707-320"]}
    for split, rows in lines.items():
        (folder / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
    splits = read_splits(str(tmp_path), "fgvc_aircraft")
    assert splits["train"][0] == Item(str(folder / "images" / "0001.jpg"), 2, "Cessna 172")
    assert classnames_of(splits["test"]) == variants
    assert [len(splits[k]) for k in ("train", "val", "test")] == [3, 1, 3]


def test_imagenet_folders(tmp_path):
    images = tmp_path / "imagenet" / "images"
    for split in ("train", "val"):
        for wnid in ("n02", "n01"):
            save_rgb(str(images / split / wnid / "x.JPEG"))
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish fish\n")
    splits = read_splits(str(tmp_path), "imagenet")
    assert splits["val"] == []
    assert classnames_of(splits["train"]) == ["tench", "goldfish fish"]  # sorted wnids
    assert splits["test"][0].path == str(images / "val" / "n01" / "x.JPEG")


def test_class_name_lists_in_utf8_with_a_bom_read_and_other_encodings_refused(tmp_path):
    images = tmp_path / "imagenet" / "images"
    for split in ("train", "val"):
        for wnid in ("n02", "n01"):
            save_rgb(str(images / split / wnid / "x.JPEG"))
    names = tmp_path / "imagenet" / "classnames.txt"
    names.write_bytes("n01 tenché\r\nn02 goldfish\r\n".encode("utf-8-sig"))   # Windows Notepad's UTF-8
    assert classnames_of(read_splits(str(tmp_path), "imagenet")["train"]) == ["tenché", "goldfish"]
    names.write_bytes("n01 tenché\nn02 goldfish\n".encode("latin-1"))
    with pytest.raises(DataError, match="classnames.txt is not UTF-8 text .*save it as UTF-8"):
        read_splits(str(tmp_path), "imagenet")
    names.write_text("\n  \n")   # ImageNet's names are required: an empty file must not give wnids as names
    with pytest.raises(DataError, match="classnames.txt is empty"):
        read_splits(str(tmp_path), "imagenet")


def test_only_regular_files_are_opened_as_images(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)   # opening it would block until a writer appears: forever
    with pytest.raises(DataError, match="fifo.png: not a regular file"):
        ImageDataset([Item(str(fifo), 0, "x")], lambda im: im)[0]


@pytest.mark.slow
def test_an_image_header_claiming_a_gigapixel_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (40000, 40000)).save(path)   # 200 KB on disk, 4.8 GB as RGB
    with pytest.raises(DataError, match="bomb.png"):
        ImageDataset([Item(str(path), 0, "x")], lambda im: im)[0]


def test_known_dataset_as_imagefolder(tmp_path):
    make_synthetic_imagefolder(str(tmp_path), "dtd", n_classes=2, n_train=1, n_val=0, n_test=1)
    assert len(read_splits(str(tmp_path), "dtd")["train"]) == 2
    assert DATASETS["dtd"].template.format("banded") == "banded texture."


# ---------------------------------------------------------------------------------------------
# Errors

def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError, match="split_zhou_EuroSAT.json") as e:
        read_splits(str(tmp_path), "eurosat")
    assert "not found" in str(e.value) and "--root" in str(e.value) and "ImageFolder" in str(e.value)
    with pytest.raises(DataError, match="ImageFolder tree"):
        read_splits(str(tmp_path), "my_data")


def test_unknown_layout(tmp_path):
    (tmp_path / "eurosat").mkdir()
    with pytest.raises(DataError, match="unknown layout"):
        read_splits(str(tmp_path), "eurosat")


def test_empty_class_folder(tmp_path):
    make_synthetic_imagefolder(str(tmp_path), n_classes=3, n_train=2, n_val=0, n_test=1)
    os.makedirs(tmp_path / "synthetic" / "train" / "class_03")
    (tmp_path / "synthetic" / "train" / "class_03" / "notes.txt").write_text("not an image")
    with open(tmp_path / "synthetic" / "classnames.txt", "a") as f:
        f.write("class_03 empty\n")
    with pytest.raises(DataError, match="class folder .*class_03 has no images"):
        read_splits(str(tmp_path), "synthetic")


def test_train_test_class_mismatch(tmp_path):
    make_synthetic_imagefolder(str(tmp_path), n_classes=3, n_train=2, n_val=0, n_test=1)
    os.rename(tmp_path / "synthetic" / "test" / "class_02", tmp_path / "synthetic" / "test" / "class_09")
    with pytest.raises(DataError, match=r"differ from train: extra \['class_09'\], missing \['class_02'\]"):
        read_splits(str(tmp_path), "synthetic")


def test_single_class_split(tmp_path):
    make_synthetic_imagefolder(str(tmp_path), n_classes=1, n_train=2, n_val=0, n_test=1)
    with pytest.raises(DataError, match="1 class.*at least 2"):
        read_splits(str(tmp_path), "synthetic")


def test_bad_json(tmp_path):
    (tmp_path / "eurosat").mkdir()
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text('{"train": [[')
    with pytest.raises(DataError, match="cannot parse split file .*split_zhou_EuroSAT.json"):
        read_splits(str(tmp_path), "eurosat")
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text("[" * 100000)
    with pytest.raises(DataError, match="cannot parse split file .*split_zhou_EuroSAT.json"):
        read_splits(str(tmp_path), "eurosat")
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text('{"train": []}')
    with pytest.raises(DataError, match="'train', 'val' and 'test'"):
        read_splits(str(tmp_path), "eurosat")
    # a short entry, and labels / paths / names that int() or str() would have bent into shape
    # (1e400 parses as inf, whose int() overflows; 1.5 would become 1, true 1, "3" 3)
    for entry in ('["a.jpg", "one"]', '["a.jpg", 1e400, "River"]', '["a.jpg", 1.5, "River"]', '["a.jpg", true, "River"]',
                  '["a.jpg", "3", "River"]', '["a.jpg", -1, "River"]', '[7, 0, "River"]', '["a.jpg", 0, 5]'):
        (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text('{"train": [%s], "val": [], "test": []}' % entry)
        with pytest.raises(DataError, match=r"entry 0 of 'train' .*expected \[path, int label >= 0, classname\]"):
            read_splits(str(tmp_path), "eurosat")


def test_json_with_wrong_image_dir(tmp_path):
    (tmp_path / "eurosat").mkdir()
    split = [["River/1.jpg", 0, "River"], ["Sea/1.jpg", 1, "Sea"]]
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps({"train": split, "val": [],
                                                                             "test": split}))
    with pytest.raises(DataError, match="River/1.jpg listed in split_zhou_EuroSAT.json not found"):
        read_splits(str(tmp_path), "eurosat")


def write_eurosat_split(tmp_path, entries: dict) -> None:
    """split_zhou_EuroSAT.json with `entries` and an image for every entry."""
    for split in entries.values():
        for rel, _, _ in split:
            save_rgb(str(tmp_path / "eurosat" / "2750" / rel))
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(entries))


def test_label_with_two_names_across_splits(tmp_path):
    """Label 1 is Forest in train and val but Pasture in test: later code would use test's name."""
    write_eurosat_split(tmp_path, {
        "train": [["Forest/Forest_1.jpg", 1, "Forest"], ["River/River_1.jpg", 0, "River"]],
        "val": [["Forest/Forest_2.jpg", 1, "Forest"]],
        "test": [["River/River_3.jpg", 0, "River"], ["Pasture/Pasture_3.jpg", 1, "Pasture"]]})
    with pytest.raises(DataError) as e:
        read_splits(str(tmp_path), "eurosat")
    message = str(e.value)
    assert "\n" not in message
    assert "label 1 of " in message and "two class names, 'Forest' (train) and 'Pasture' (test)" in message
    assert "split file is inconsistent" in message and "re-download" in message and "DATASETS.md" in message


def test_label_with_two_names_within_a_split(tmp_path):
    write_eurosat_split(tmp_path, {
        "train": [["River/River_1.jpg", 0, "River"], ["Forest/Forest_1.jpg", 1, "Forest"],
                  ["Forest/Forest_2.jpg", 1, "forest"]],
        "val": [],
        "test": [["River/River_3.jpg", 0, "River"], ["Forest/Forest_3.jpg", 1, "Forest"]]})
    with pytest.raises(DataError, match=r"label 1 of .* two class names, 'Forest' \(train\) and 'forest' "
                                        r"\(train\): the split file is inconsistent; re-download"):
        read_splits(str(tmp_path), "eurosat")


def test_consistent_names_pass(tmp_path):
    """The check must not reject a split where each label keeps its name everywhere."""
    write_eurosat_split(tmp_path, {
        "train": [["River/River_1.jpg", 0, "River"], ["Forest/Forest_1.jpg", 1, "Forest"]],
        "val": [["Forest/Forest_2.jpg", 1, "Forest"]],
        "test": [["Forest/Forest_3.jpg", 1, "Forest"], ["River/River_3.jpg", 0, "River"]]})
    splits = read_splits(str(tmp_path), "eurosat")
    assert classnames_of(splits["test"]) == classnames_of(splits["train"]) == ["River", "Forest"]


def test_unreadable_image(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\x00garbage, not a jpeg" * 10)
    for cache in (True, False):
        with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg.*remove or replace"):
            ImageDataset([Item(str(path), 0, "x")], test_transform(32), cache=cache)[0]


def test_truncated_image(tmp_path):
    save_rgb(str(tmp_path / "full.png"), size=64)
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.png"):
        ImageDataset([Item(str(tmp_path / "cut.png"), 0, "x")], test_transform(32))[0]


# ---------------------------------------------------------------------------------------------
# Image modes, transforms, caching

def make_mode_image(mode: str) -> Image.Image:
    ramp = np.tile(np.linspace(0, 1, 16), (16, 1))  # (H, W) in [0, 1], mean 0.5
    if mode == "I;16":
        return Image.fromarray((ramp * 65535).astype(np.uint16))
    grey = Image.fromarray((ramp * 255).astype(np.uint8))
    if mode == "P":
        return grey.convert("RGB").quantize(8)
    if mode == "P+transparency":
        im = grey.convert("RGB").quantize(8)
        im.info["transparency"] = 0
        return im
    return grey.convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "P+transparency", "CMYK", "I;16", "LA", "1"])
def test_image_modes_load_as_rgb(tmp_path, mode):
    im = make_mode_image(mode)
    ext = "tiff" if mode == "CMYK" else "png"
    path = str(tmp_path / f"img.{ext}")
    im.save(path)
    if mode == "I;16":
        with Image.open(path) as saved:
            assert saved.mode in ("I;16", "I")
    x, label, index = ImageDataset([Item(path, 3, "x")], test_transform(16))[0]
    assert x.shape == (3, 16, 16) and label == 3 and index == 0
    pixels = x * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    if mode != "1":  # the ramp survives: mean near 0.5, neither saturated white nor black
        assert 0.3 < pixels.mean().item() < 0.7, mode


def test_transform_shapes(tmp_path):
    image = Image.new("RGB", (300, 120), (10, 200, 30))
    assert train_transform()(image).shape == (3, 224, 224)
    assert test_transform()(image).shape == (3, 224, 224)
    assert train_transform(96)(image).shape == (3, 96, 96)
    assert test_transform(96)(image).shape == (3, 96, 96)


def test_train_view_is_torchvisions_compose_bit_for_bit():
    """draw + render (so DPC can render negatives on threads) must equal the plain torchvision pipeline."""
    from torchvision import transforms as T
    reference = T.Compose([T.RandomResizedCrop(64, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 64), (90, 140), (150, 40))]
    torch.manual_seed(3)
    expected = [reference(im) for im in images * 4]
    torch.manual_seed(3)
    view = train_transform(64)
    assert all(torch.equal(view(im), e) for im, e in zip(images * 4, expected))
    torch.manual_seed(3)
    views = [view.draw(im) for im in images * 4]  # all draws first, renders later: same tensors
    assert all(torch.equal(view.render(im, v), e) for im, v, e in zip(images * 4, views, expected))


def test_cache_matches_uncached(tmp_path):
    make_synthetic_imagefolder(str(tmp_path), n_classes=2, n_train=3, n_val=0, n_test=1)
    items = read_splits(str(tmp_path), "synthetic")["train"]
    cached = ImageDataset(items, test_transform(24), cache=True)
    plain = ImageDataset(items, test_transform(24), cache=False)
    assert len(cached) == len(plain) == 6
    for i in range(len(items)):
        (a, la, ia), (b, lb, ib) = cached[i], plain[i]
        assert torch.equal(a, b) and la == lb == items[i].label and ia == ib == i
    batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=4)))
    assert batch[0].shape == (4, 3, 24, 24) and batch[2].tolist() == [0, 1, 2, 3]
