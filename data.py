"""Datasets, splits, few-shot sampling, base/new subsampling and transforms for CLIP prompt tuning.

What this file does
  read_splits(root, dataset)   -> {"train", "val", "test"} lists of Item(path, label, classname)
  few_shot(train, val, K, seed) -> the K-shot train set and min(K, 4)-shot val set
  subsample(splits, "base")    -> first ceil(n/2) sorted labels (or "new": the rest), relabelled from 0
  ImageDataset(items, transform, cache) -> (image tensor, label, index)

Three on-disk layouts are read:
  1. The CoOp layout of the 11 base-to-new datasets (`DATASETS` below): a `split_zhou_<Name>.json`
     per dataset, FGVCAircraft's official txt files, and ImageNet's train/val folders plus
     classnames.txt. This is the protocol of CoOp (Zhou et al., IJCV 2022) and CoCoOp (CVPR 2022)
     as implemented on Dassl.pytorch (KaiyangZhou/Dassl.pytorch, `DatasetBase`), which MaPLe,
     PromptSRC, PromptKD and DPC all reuse.
  2. The CoOp layout of the 4 cross-domain test sets of Tab. 2 (`CROSS_DOMAIN`), read as CoOp's
     datasets/imagenetv2.py, imagenet_sketch.py, imagenet_a.py and imagenet_r.py read them; each
     folder holds a copy of ImageNet's classnames.txt (1000 "<wnid> <name>" lines):
       imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/  folder i = label i = line i
       imagenet-sketch/images/<wnid>/                  1000 classes, labels = sorted wnid folders
       imagenet-adversarial/imagenet-a/<wnid>/         200 classes, labels = sorted wnid folders
       imagenet-rendition/imagenet-r/<wnid>/           200 classes, labels = sorted wnid folders
     They are test sets only: train and test are both every image, val is empty.
  3. A plain ImageFolder tree `<root>/<dataset>/{train,val,test}/<class folder>/<image>` (val is
     optional), with an optional `classnames.txt` of "<folder> <readable name>" lines. Use it for
     your own data and for the synthetic tree the tests generate.

Published base-to-new numbers are only comparable when the splits come from CoOp's split_zhou
JSONs (and, for FGVCAircraft/ImageNet, the official lists): an ImageFolder tree of the same images
with a different train/test split gives numbers that are not comparable to any published table.
`few_shot` replays Dassl's `generate_fewshot_dataset` so that, given the same JSON and seed, the
K-shot sets equal the published ones (Dassl caches them as split_fewshot/shot_K-seed_S.pkl).

Usage:
  splits = read_splits("/data", "eurosat")
  train, val = few_shot(splits["train"], splits["val"], shots=16, seed=1)
  base = subsample({"train": train, "val": val, "test": splits["test"]}, "base")
  loader = DataLoader(ImageDataset(base["train"], train_transform(), cache=True), batch_size=32)
"""

import json
import math
import os
import random
import shutil
from functools import lru_cache
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

# Dataset images are the user's own files, not untrusted uploads: decode large ones (PIL refuses
# more than 179M pixels by default), but not a header that claims more than 1G pixels (3 GB decoded).
Image.MAX_IMAGE_PIXELS = 2 ** 30 // 2   # PIL raises DecompressionBombError at twice this
from torchvision import transforms as T
from torchvision.transforms import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SUBSAMPLE_CHOICES = ("base", "new", "all")


class DataError(ValueError):
    """A problem with the user's data on disk or a bad argument; the message says how to fix it."""


class Item(NamedTuple):
    path: str  # absolute or root-joined image path
    label: int  # 0-based class index
    classname: str  # human-readable name, "_" kept as stored (learners replace "_" with " ")


class DatasetInfo(NamedTuple):
    name: str  # CLI name (--data)
    folder: str  # directory under --root
    image_dir: str  # image root inside `folder` that split paths are relative to ("" = folder)
    split_file: str | None  # CoOp split JSON inside `folder`; None for FGVCAircraft, ImageNet, CROSS_DOMAIN
    template: str  # CoOp's hand-crafted zero-shot template (CUSTOM_TEMPLATES)
    display_name: str  # Dassl's DATASET.NAME
    # Which CoOp reader: "split_json", "aircraft", "imagenet", "imagenet_v2" (label-index folders)
    # or "wnid_folders" (ImageNet-Sketch/-A/-R: sorted wnid folders named by classnames.txt).
    layout: str = "split_json"


def _info(name, folder, image_dir, display_name, template, layout="split_json"):
    split_file = f"split_zhou_{display_name}.json" if layout == "split_json" else None
    return DatasetInfo(name, folder, image_dir, split_file, template, display_name, layout)


# Folders, image roots and split files follow CoOp's DATASETS.md; templates are CoOp's CUSTOM_TEMPLATES.
DATASETS: dict[str, DatasetInfo] = {
    "imagenet": _info("imagenet", "imagenet", "images", "ImageNet", "a photo of a {}.", layout="imagenet"),
    "caltech101": _info("caltech101", "caltech-101", "101_ObjectCategories", "Caltech101",
                        "a photo of a {}."),
    "oxford_pets": _info("oxford_pets", "oxford_pets", "images", "OxfordPets",
                         "a photo of a {}, a type of pet."),
    "stanford_cars": _info("stanford_cars", "stanford_cars", "", "StanfordCars", "a photo of a {}."),
    "oxford_flowers": _info("oxford_flowers", "oxford_flowers", "jpg", "OxfordFlowers",
                            "a photo of a {}, a type of flower."),
    "food101": _info("food101", "food-101", "images", "Food101", "a photo of {}, a type of food."),
    "fgvc_aircraft": _info("fgvc_aircraft", "fgvc_aircraft", "images", "FGVCAircraft",
                           "a photo of a {}, a type of aircraft.", layout="aircraft"),
    "sun397": _info("sun397", "sun397", "SUN397", "SUN397", "a photo of a {}."),
    "dtd": _info("dtd", "dtd", "images", "DescribableTextures", "{} texture."),
    "eurosat": _info("eurosat", "eurosat", "2750", "EuroSAT", "a centered satellite photo of {}."),
    "ucf101": _info("ucf101", "ucf101", "UCF-101-midframes", "UCF101", "a photo of a person doing {}."),
    # Tab. 2's cross-domain targets (test only), with the ImageNet template as in CUSTOM_TEMPLATES.
    "imagenet_v2": _info("imagenet_v2", "imagenetv2", "imagenetv2-matched-frequency-format-val", "ImageNetV2",
                         "a photo of a {}.", layout="imagenet_v2"),
    "imagenet_sketch": _info("imagenet_sketch", "imagenet-sketch", "images", "ImageNetSketch",
                             "a photo of a {}.", layout="wnid_folders"),
    "imagenet_a": _info("imagenet_a", "imagenet-adversarial", "imagenet-a", "ImageNetA", "a photo of a {}.",
                        layout="wnid_folders"),
    "imagenet_r": _info("imagenet_r", "imagenet-rendition", "imagenet-r", "ImageNetR", "a photo of a {}.",
                        layout="wnid_folders"),
}
# The cross-domain targets of the paper's Tab. 2 (source: ImageNet), in its column order.
CROSS_DOMAIN = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


# ----------------------------------------------------------------------------------------------
# Reading splits

def read_splits(root: str, dataset: str) -> dict[str, list[Item]]:
    """Read train/val/test for `dataset` under `root`; "val" may be empty (ImageNet, no val/ folder;
    the CROSS_DOMAIN test sets, whose train and test are both every image).

    A known dataset is read from its CoOp layout when present, otherwise from an ImageFolder tree
    in the same folder; any other name is read as an ImageFolder tree `<root>/<dataset>/`.
    """
    info = DATASETS.get(dataset)
    folder = os.path.join(root, info.folder if info else dataset)
    if not os.path.isdir(folder):
        raise DataError(f"dataset folder {folder} not found: expected {_expected_layouts(root, dataset)}; "
                        f"pass --root (known datasets: {', '.join(DATASETS)})")
    layout = info.layout if info else None
    if layout == "split_json" and os.path.isfile(os.path.join(folder, info.split_file)):
        splits = _read_split_json(os.path.join(folder, info.split_file), os.path.join(folder, info.image_dir))
    elif layout == "aircraft" and os.path.isfile(os.path.join(folder, "variants.txt")):
        splits = _read_aircraft(folder)
    elif layout == "imagenet" and os.path.isdir(os.path.join(folder, "images", "train")):
        splits = _read_imagenet(folder)
    elif layout == "imagenet_v2" and os.path.isdir(os.path.join(folder, info.image_dir)):
        splits = _read_imagenet_v2(folder, info)
    elif layout == "wnid_folders" and os.path.isdir(os.path.join(folder, info.image_dir)):
        splits = _read_wnid_folders(folder, info)
    elif os.path.isdir(os.path.join(folder, "train")):
        val_dir = os.path.join(folder, "val")
        splits = _read_tree({"train": os.path.join(folder, "train"), "test": os.path.join(folder, "test"),
                             "val": val_dir if os.path.isdir(val_dir) else None},
                            _read_classnames_txt(os.path.join(folder, "classnames.txt"), required=False))
    else:
        raise DataError(f"unknown layout in {folder}: expected {_expected_layouts(root, dataset)}")
    _check_splits(splits, folder)
    return splits


def _expected_layouts(root: str, dataset: str) -> str:
    """One phrase naming the layouts read_splits accepts for this dataset, for error messages."""
    info = DATASETS.get(dataset)
    folder = os.path.join(root, info.folder if info else dataset)
    tree = f"an ImageFolder tree {folder}/{{train,test}}/<class>/"
    return f"{_coop_layout(folder, info)}, or {tree}" if info else tree


def _coop_layout(folder: str, info: DatasetInfo) -> str:
    """The CoOp (DATASETS.md) layout of one known dataset in `folder`, for error messages."""
    if info.layout == "aircraft":
        return f"{folder}/ with variants.txt + images_variant_{{train,val,test}}.txt + images/"
    if info.layout == "imagenet":
        return f"{folder}/ with classnames.txt + images/{{train,val}}/<wnid>/"
    if info.layout == "imagenet_v2":
        return f"{folder}/ with ImageNet's classnames.txt + {info.image_dir}/<0..999>/"
    if info.layout == "wnid_folders":
        return f"{folder}/ with ImageNet's classnames.txt + {info.image_dir}/<wnid>/"
    return f"{folder}/ with {info.split_file} + {info.image_dir or 'its images'}/"


def _read_split_json(path: str, image_dir: str) -> dict[str, list[Item]]:
    """CoOp's split_zhou JSON: {"train"|"val"|"test": [[relative_path, label, classname], ...]}."""
    name = os.path.basename(path)
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError, RecursionError) as e:   # RecursionError: nesting deeper than Python's stack
        raise DataError(f"cannot parse split file {path}: {e}; "
                        f"re-download it from the links in CoOp's DATASETS.md") from e
    if not isinstance(raw, dict) or any(not isinstance(raw.get(k), list) for k in ("train", "val", "test")):
        raise DataError(f"split file {path} must be a JSON object with lists 'train', 'val' and 'test'")
    splits = {}
    for split in ("train", "val", "test"):
        items = []
        for i, entry in enumerate(raw[split]):
            try:
                rel_path, label, classname = entry
                if not (isinstance(rel_path, str) and isinstance(label, int) and not isinstance(label, bool)
                        and label >= 0 and isinstance(classname, str)):
                    raise ValueError
                items.append(Item(os.path.join(image_dir, rel_path), label, classname))
            except (TypeError, ValueError) as e:
                raise DataError(f"{name}: entry {i} of '{split}' is {entry!r}, "
                                f"expected [path, int label >= 0, classname]") from e
        # Checking one file per split catches a wrong image_dir without stat-ing 50k files.
        if items and not os.path.isfile(items[0].path):
            raise DataError(f"image {items[0].path} listed in {name} not found: expected the images under "
                            f"{image_dir}; check --root and the dataset folder layout")
        splits[split] = items
    return splits


def _read_aircraft(folder: str) -> dict[str, list[Item]]:
    """FGVCAircraft from its official lists: label = line index in variants.txt (as in CoOp)."""
    classnames = [line.strip() for line in read_text_lines(os.path.join(folder, "variants.txt")) if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    splits = {}
    for split in ("train", "val", "test"):
        path = os.path.join(folder, f"images_variant_{split}.txt")
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: FGVCAircraft needs images_variant_{{train,val,test}}.txt "
                            f"from fgvc-aircraft-2013b/data in {folder}")
        items = []
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                image_id, _, classname = line.strip().partition(" ")
                if classname not in label_of:
                    raise DataError(f"{path}: variant {classname!r} is not in variants.txt; use the files "
                                    f"from the same fgvc-aircraft release")
                path_jpg = os.path.join(folder, "images", image_id + ".jpg")
                items.append(Item(path_jpg, label_of[classname], classname))
        splits[split] = items
    return splits


def _read_imagenet(folder: str) -> dict[str, list[Item]]:
    """ImageNet as CoOp reads it: labels = sorted wnid folders, test = the official val set, no val.

    Dassl lists images in os.listdir order; we sort them so runs are machine-independent. CoOp
    ships no ImageNet split JSON, so its few-shot draws depend on that order either way.
    """
    images = os.path.join(folder, "images")
    names = _read_classnames_txt(os.path.join(folder, "classnames.txt"), required=True)
    return _read_tree({"train": os.path.join(images, "train"), "val": None,
                       "test": os.path.join(images, "val")}, names)


def _cross_domain_classnames(folder: str, info: DatasetInfo) -> dict[str, str]:
    """{wnid: name} in file order from the copy of ImageNet's classnames.txt that CoOp puts in each
    cross-domain folder; its absence is reported with the whole expected layout."""
    path = os.path.join(folder, "classnames.txt")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: {info.display_name} takes its class names from ImageNet's "
                        f"classnames.txt (1000 '<wnid> <name>' lines); expected {_coop_layout(folder, info)}")
    return _read_classnames_txt(path, required=True)


def _read_imagenet_v2(folder: str, info: DatasetInfo) -> dict[str, list[Item]]:
    """ImageNet-V2 as CoOp's imagenetv2.py reads it: folder "i" holds label i, named by line i of
    classnames.txt (the folders carry label indices, not wnids); items in label order 0, 1, ..., 9, 10
    (CoOp loops over range(1000)), not in the folders' string order 0, 1, 10.

    A folder with no line (or a line with no folder) means classnames.txt is not ImageNet's file in
    ImageNet's order, which would silently misname every class after it: both are errors.
    """
    names = list(_cross_domain_classnames(folder, info).values())
    image_dir = os.path.join(folder, info.image_dir)
    expected = [str(label) for label in range(len(names))]
    found = set(_class_folders(image_dir))
    missing = [f for f in expected if f not in found]
    if missing:
        raise DataError(f"{image_dir} lacks label folder(s) {', '.join(missing[:5])}: {info.display_name} needs "
                        f"one folder per line of classnames.txt ({len(names)} lines), named 0..{len(names) - 1}; "
                        f"expected {_coop_layout(folder, info)}")
    extra = sorted(found - set(expected), key=lambda f: (len(f), f))  # "1000" after "999", not after "1"
    if extra:
        raise DataError(f"{image_dir} has folder(s) {', '.join(extra[:5])} that are not label indices "
                        f"0..{len(names) - 1} of classnames.txt ({len(names)} lines): use ImageNet's full "
                        f"classnames.txt; expected {_coop_layout(folder, info)}")
    items = [Item(path, label, names[label])
             for label in range(len(names)) for path in _list_images(os.path.join(image_dir, str(label)))]
    return {"train": items, "val": [], "test": items}


def _read_wnid_folders(folder: str, info: DatasetInfo) -> dict[str, list[Item]]:
    """ImageNet-Sketch/-A/-R as CoOp's readers see them: label = index among the sorted wnid folders
    (1000 for Sketch, 200 for A and R), name = classnames[wnid] from ImageNet's full classnames.txt.

    Only folders are classes, so the README.txt that ships inside imagenet-a/ and imagenet-r/ is
    skipped, as CoOp's TO_BE_IGNORED does. Test sets only: train = test = every image, no val.
    """
    names = _cross_domain_classnames(folder, info)
    image_dir = os.path.join(folder, info.image_dir)
    wnids = _class_folders(image_dir)
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise DataError(f"class folder(s) {', '.join(unknown[:5])} of {image_dir} have no line in "
                        f"{os.path.join(folder, 'classnames.txt')}: {info.display_name} needs ImageNet's "
                        f"1000-class classnames.txt; expected {_coop_layout(folder, info)}")
    items = [Item(path, label, names[wnid])
             for label, wnid in enumerate(wnids) for path in _list_images(os.path.join(image_dir, wnid))]
    return {"train": items, "val": [], "test": items}


def _read_classnames_txt(path: str, required: bool) -> dict[str, str]:
    """Lines "<folder> <readable name with spaces>" -> {folder: name} (ImageNet's classnames.txt format)."""
    if not os.path.isfile(path):
        if required:
            raise DataError(f"{path} not found: it maps class folders to names, "
                            f"one '<folder> <name>' per line")
        return {}
    names = {}
    for line in read_text_lines(path):
        folder, _, name = line.strip().partition(" ")
        if folder:
            names[folder] = name.strip() or folder
    if required and not names:
        raise DataError(f"{path} is empty: it maps class folders to names, one '<folder> <name>' per line")
    return names


def read_text_lines(path: str) -> list[str]:
    """The lines of a class-name list (classnames.txt, variants.txt): UTF-8, with or without a BOM."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None


def _list_images(class_dir: str) -> list[str]:
    """Sorted image files in one class folder (extension match is case-insensitive)."""
    # scandir's is_file() needs no extra stat per file, which matters for ImageNet's 1.28M images.
    files = sorted(e.name for e in os.scandir(class_dir) if not e.name.startswith(".")
                   and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
    if not files:
        raise DataError(f"class folder {class_dir} has no images ({'/'.join(IMAGE_EXTENSIONS)}); "
                        f"add images or delete the folder")
    return [os.path.join(class_dir, f) for f in files]


def _class_folders(split_dir: str) -> list[str]:
    """Sorted, non-hidden sub-folders of a split folder: sorted order defines the labels."""
    if not os.path.isdir(split_dir):
        raise DataError(f"split folder {split_dir} not found: an ImageFolder tree needs train/ and test/ "
                        f"(val/ optional), each with one sub-folder per class")
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _read_tree(split_dirs: dict[str, str | None], names: dict[str, str]) -> dict[str, list[Item]]:
    """Read ImageFolder splits; labels come from train's sorted class folders, shared by val/test."""
    train_classes = _class_folders(split_dirs["train"])
    label_of = {c: i for i, c in enumerate(train_classes)}
    if names:
        missing = [c for c in train_classes if c not in names]
        if missing:
            raise DataError(f"classnames.txt has no line for class folder(s) {', '.join(missing[:5])}; "
                            f"add '<folder> <name>' lines or delete the file")
    splits = {}
    for split in ("train", "val", "test"):
        split_dir = split_dirs[split]
        if split_dir is None:
            splits[split] = []
            continue
        classes = _class_folders(split_dir)
        extra = sorted(set(classes) - set(train_classes))
        if extra or (split == "test" and set(classes) != set(train_classes)):
            lacking = sorted(set(train_classes) - set(classes))
            raise DataError(f"class folders of {split_dir} differ from train: extra {extra[:5]}, missing "
                            f"{lacking[:5]}; {split} must use the train classes")
        splits[split] = [Item(p, label_of[c], names.get(c, c))
                         for c in classes for p in _list_images(os.path.join(split_dir, c))]
    return splits


def _check_splits(splits: dict[str, list[Item]], folder: str) -> None:
    """Reject splits no classifier can be trained or evaluated on, whatever layout they came from."""
    for split in ("train", "test"):
        n = len({it.label for it in splits[split]})
        if n < 2:
            raise DataError(f"the {split} split of {folder} has {n} class(es); at least 2 are needed")
    _check_one_name_per_label(splits, folder)
    train_labels, test_labels = {it.label for it in splits["train"]}, {it.label for it in splits["test"]}
    if train_labels != test_labels:
        raise DataError(f"train and test of {folder} have different classes (train {len(train_labels)}, "
                        f"test {len(test_labels)}, shared {len(train_labels & test_labels)}); fix the split")


def _check_one_name_per_label(splits: dict[str, list[Item]], folder: str) -> None:
    """One class name per label in and across splits: otherwise the prompts of a label would name a
    different class depending on which split classnames_of() is called on (evaluation uses test's)."""
    seen: dict[int, tuple[str, str]] = {}  # label -> (class name, the split it was first seen in)
    for split in ("train", "val", "test"):
        for it in splits[split]:
            name, where = seen.setdefault(it.label, (it.classname, split))
            if name != it.classname:
                raise DataError(f"label {it.label} of {folder} has two class names, {name!r} ({where}) and "
                                f"{it.classname!r} ({split}): the split file is inconsistent; re-download it "
                                f"from the links in CoOp's DATASETS.md")


# ----------------------------------------------------------------------------------------------
# Few-shot sampling and base/new subsampling (CoOp protocol)

def _sample_per_label(items: list[Item], shots: int, rng: random.Random) -> list[Item]:
    """One pass of Dassl's generate_fewshot_dataset (repeat=False) over one list."""
    groups: dict[int, list[Item]] = {}  # insertion order = first appearance, like Dassl's defaultdict
    for it in items:
        groups.setdefault(it.label, []).append(it)
    out = []
    for group in groups.values():
        out.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return out


def few_shot(train: list[Item], val: list[Item], shots: int, seed: int) -> tuple[list[Item], list[Item]]:
    """K images per class from train and min(K, 4) from val, over ALL classes (before subsample).

    Replays Dassl: `random.seed(seed)` then `random.sample` per label, train first and val with the
    same stream, so the sets equal the published split_fewshot/shot_K-seed_S.pkl for the same JSON
    order. A fresh random.Random(seed) yields the same stream without touching global state.
    shots <= 0 returns everything.
    """
    if shots <= 0:
        return list(train), list(val)
    rng = random.Random(seed)
    return _sample_per_label(train, shots, rng), _sample_per_label(val, min(shots, 4), rng)


def subsample(splits: dict[str, list[Item]], which: str) -> dict[str, list[Item]]:
    """CoOp's subsample_classes: base = first ceil(n/2) sorted train labels, new = the rest.

    Each split keeps only the chosen labels, relabelled from 0 (new label L -> L - m), so each group
    is classified among its own classes. Run it after few_shot: the draw is over all classes.
    """
    if which not in SUBSAMPLE_CHOICES:
        raise DataError(f"subsample must be one of {', '.join(SUBSAMPLE_CHOICES)}, got {which!r}")
    if which == "all":
        return {k: list(v) for k, v in splits.items()}
    labels = sorted({it.label for it in splits["train"]})
    m = math.ceil(len(labels) / 2)
    chosen = labels[:m] if which == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(chosen)}
    return {k: [it._replace(label=relabel[it.label]) for it in v if it.label in relabel]
            for k, v in splits.items()}


def classnames_of(items: list[Item]) -> list[str]:
    """Class names ordered by label; the prompt learner's class order must match the labels."""
    names: dict[int, str] = {}
    for it in items:
        if names.setdefault(it.label, it.classname) != it.classname:
            raise DataError(f"label {it.label} has two class names, {names[it.label]!r} and {it.classname!r}")
    if sorted(names) != list(range(len(names))):
        raise DataError(f"labels must be 0..n-1 without gaps, got {sorted(names)[:10]}...; "
                        f"take class names from the train split after subsample()")
    return [names[i] for i in range(len(names))]


# ----------------------------------------------------------------------------------------------
# Transforms and the torch Dataset

class TrainView:
    """Dassl's random_resized_crop + random_flip + normalize (scale 0.08-1, bicubic, CLIP mean/std).

    Split in two so that views can be rendered in parallel threads and still be reproducible:
    `draw` makes the random choices from torch's global RNG, in the order torchvision's
    RandomResizedCrop + RandomHorizontalFlip make them; `render` is deterministic (and PIL's resize
    releases the GIL). view(image) = render(image, draw(image)) is torchvision's Compose, bit for bit."""

    SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)

    def __init__(self, size: int = 224):
        self.size = size

    def draw(self, image: Image.Image) -> tuple[int, int, int, int, bool]:
        top, left, height, width = T.RandomResizedCrop.get_params(image, self.SCALE, self.RATIO)
        return top, left, height, width, bool(torch.rand(1) < 0.5)  # the crop box, then the flip

    def render(self, image: Image.Image, view: tuple[int, int, int, int, bool]) -> torch.Tensor:
        top, left, height, width, flip = view
        crop = TF.resized_crop(image, top, left, height, width, [self.size, self.size],
                               T.InterpolationMode.BICUBIC, antialias=True)
        crop = TF.hflip(crop) if flip else crop
        return TF.normalize(TF.to_tensor(crop), CLIP_MEAN, CLIP_STD)  # (3, size, size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.render(image, self.draw(image))


def train_transform(size: int = 224) -> TrainView:
    return TrainView(size)


def test_transform(size: int = 224) -> Callable:
    """Resize the shorter side to `size` (bicubic), centre-crop, normalize: Dassl's and CLIP's test view."""
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


test_transform.__test__ = False  # a test file that imports it would otherwise have pytest collect it


def _to_rgb(im: Image.Image) -> Image.Image:
    """convert("RGB"), except integer images, which PIL would clip to 255 (a white image)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.int64)
        # 16-bit data -> 8-bit by /256; an "I" image whose values already fit 8 bits is kept as is.
        if im.mode != "I" or arr.max(initial=0) > 255:
            arr = arr >> 8
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha is then dropped
    return im.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Decode one image to 8-bit RGB, or raise DataError naming the file (a FIFO or device listed as an
    image would block the run forever: only regular files are opened)."""
    if not os.path.isfile(path):
        raise DataError(f"cannot read image {path}: not a regular file; remove it or fix the split file")
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}; remove or replace the file") from e


class ImageDataset(torch.utils.data.Dataset):
    """Items -> (transformed image, label, index); the index tells the caller which item was drawn.

    cache=True decodes every image once here and keeps the PIL images in memory (the random
    transform still runs per access): meant for few-shot train sets, where decoding would otherwise
    dominate a step. Do not cache large test sets.
    """

    def __init__(self, items: list[Item], transform: Callable, cache: bool = False):
        self.items = list(items)
        self.transform = transform
        self.images = [load_image(it.path) for it in self.items] if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.items[index]
        image = self.images[index] if self.images is not None else load_image(item.path)
        return self.transform(image), item.label, index


# ----------------------------------------------------------------------------------------------
# Synthetic ImageFolder for tests and smoke runs

# Real colour names with their RGB values, so the class names even describe the images.
_COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 220),
            "yellow": (235, 215, 50), "purple": (130, 50, 160), "orange": (245, 140, 30),
            "pink": (240, 130, 190), "brown": (120, 75, 40), "grey": (128, 128, 128),
            "teal": (30, 140, 140), "olive": (128, 128, 30), "navy": (25, 25, 110),
            "maroon": (120, 20, 40), "cyan": (60, 220, 230), "lime": (170, 235, 60),
            "black": (20, 20, 20), "white": (235, 235, 235), "beige": (225, 205, 160),
            "indigo": (75, 20, 130), "coral": (250, 120, 90)}


def make_synthetic_imagefolder(root: str, name: str = "synthetic", n_classes: int = 10, n_train: int = 20,
                               n_val: int = 4, n_test: int = 10, size: int = 32, seed: int = 0) -> str:
    """Write a small deterministic tree `<root>/<name>/{train,val,test}/class_XX/*.png` + classnames.txt.

    Class c is colour c % 20 with c // 20 + 1 stripes ("red stripes", ..., "red stripes 2"), plus
    per-image noise, so a model can separate the classes. val/ (test/) is skipped when n_val
    (n_test) is 0. Returns `<root>/<name>`.
    """
    rs = np.random.RandomState(seed)
    out = os.path.join(root, name)
    width = max(2, len(str(n_classes - 1)))  # zero-padded so sorted folders = label order
    folders = [f"class_{i:0{width}d}" for i in range(n_classes)]
    colours = list(_COLOURS)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "classnames.txt"), "w") as f:
        for c, folder in enumerate(folders):
            repeat = c // len(colours)
            f.write(f"{folder} {colours[c % len(colours)]} stripes{f' {repeat + 1}' if repeat else ''}\n")
    x = np.arange(size)[None, :, None]  # (1, W, 1): vertical stripes along the width
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n == 0:
            continue
        for c, folder in enumerate(folders):
            mean = np.array(_COLOURS[colours[c % len(colours)]], dtype=np.float64)  # (3,)
            stripes = 30 * np.sin(2 * np.pi * (1 + c // len(colours)) * x / size)  # (1, W, 1)
            noise = rs.normal(0, 12, size=(n, size, size, 3))
            images = np.clip(mean + stripes + noise, 0, 255).astype(np.uint8)  # (n, H, W, 3)
            class_dir = os.path.join(out, split, folder)
            os.makedirs(class_dir, exist_ok=True)
            for i in range(n):
                Image.fromarray(images[i]).save(os.path.join(class_dir, f"{i}.png"), compress_level=1)
    return out


# ----------------------------------------------------------------------------------------------
# Toy world: coloured shapes named in words, where CLIP-style zero-shot transfer really happens
#
# A class is a (colour, shape) pair named in words ("red triangle"); an image is that shape on a
# textured background with nuisance: size, position, rotation, colour jitter, lighting, noise and
# photo conditions (dark, bright, warm, cool, blurry, noisy). tools/pretrain_toy_clip.py trains
# the shipped small CLIP (assets/toy_clip.pt) on captions that name the pair and, like web
# captions, some of the nuisance ("a dark blurry photo of a small red triangle on a striped
# background."), for every pair EXCEPT 16 held-out ones (toy_held_out_combos): each of their
# colours and shapes was seen, never together. The benchmark split is a downstream "dataset" of
# 8 base classes (seen pairs) and 8 new classes (held-out pairs) with a domain of its own: every
# image is warm-lit, dark and noisy, which pretraining saw together in ~0.2% of its images. So
# zero-shot CLIP with "a photo of a {}." is off-domain (prompt tuning has something to learn, as
# on EuroSAT or DTD), and zero-shot accuracy on the new classes measures compositional transfer.
# The two halves differ in what zero-shot CLIP gets wrong among their classes (TOY_BASE, TOY_NEW):
# colours among the base classes, shapes among the new ones, which is what makes tuning on the
# base classes cost new-class accuracy (README "Toy world").
# A synthetic world, not the paper's benchmark: its numbers are not comparable to any published table.

# RGB means; neighbours (red/orange/pink/brown, blue/purple, green/lime/teal) are easily confused
# once jitter, lighting and noise are added.
TOY_COLOURS = {"red": (205, 35, 40), "orange": (240, 125, 25), "yellow": (230, 205, 40),
               "lime": (150, 215, 45), "green": (35, 150, 55), "teal": (25, 145, 150),
               "blue": (40, 75, 215), "purple": (125, 55, 175), "pink": (235, 120, 185),
               "brown": (125, 75, 40)}
# circle/ring/crescent and star/cross/heart differ in a few pixels once small or blurred
TOY_SHAPES = ("circle", "triangle", "square", "star", "cross", "heart", "ring", "crescent")
TOY_BACKGROUNDS = ("striped", "blotchy", "checkered")
TOY_CONDITIONS = ("dark", "bright", "warm", "cool", "blurry", "noisy")  # photo conditions a caption may name
TOY_BENCHMARK_CONDITIONS = ("warm", "dark", "noisy")  # the benchmark's domain, in every one of its images
TOY_SIZE = 32  # image side in pixels (the toy CLIP's input resolution)


def _toy_combos(offsets: tuple[int, int]) -> list[tuple[str, str]]:
    """Shape s with the colours s + offset (mod 10): every shape twice, every colour at most twice."""
    colours = list(TOY_COLOURS)
    return [(colours[(s + o) % len(colours)], shape) for s, shape in enumerate(TOY_SHAPES) for o in offsets]


def toy_held_out_combos() -> list[tuple[str, str]]:
    """The 16 (colour, shape) pairs held out of pretraining; the benchmark's new classes are 8 of them."""
    return _toy_combos((0, 5))


# The benchmark's classes, 8 + 8. The new classes are held-out pairs in four colours, each colour on
# two shapes that only an outline tells apart (circle / heart, triangle / ring): zero-shot CLIP's
# mistakes among them are confusions of the two shapes of one colour. The base classes are seen
# pairs in the six OTHER colours (yellow / lime / green and purple / pink / brown neighbour each
# other), on eight different shapes: its mistakes among them are mostly misread colours, which the
# benchmark's light (warm, dark, noisy) garbles. Tuned on the base classes, a prompt learns to read
# those colours in that light, nothing that helps to tell a circle from a heart, and it blurs that:
# what it learns does not carry over to the new classes (the Base-New Trade-off, README "Toy world").
TOY_NEW = (("red", "circle"), ("red", "heart"), ("teal", "circle"), ("teal", "heart"),
           ("orange", "triangle"), ("orange", "ring"), ("blue", "triangle"), ("blue", "ring"))
TOY_BASE = (("yellow", "star"), ("lime", "circle"), ("green", "heart"), ("purple", "triangle"),
            ("pink", "ring"), ("brown", "crescent"), ("yellow", "cross"), ("green", "square"))


def toy_new_combos() -> list[tuple[str, str]]:
    """The benchmark's 8 new classes: held-out pairs (never in pretraining), in same-colour pairs of shapes."""
    return list(TOY_NEW)


def toy_base_combos() -> list[tuple[str, str]]:
    """The benchmark's 8 base classes: pairs seen in pretraining, in colours no new class has."""
    return list(TOY_BASE)


def toy_pretraining_combos() -> list[tuple[str, str]]:
    """Every pair except the held-out ones (64 of 80): the only pairs the toy CLIP's captions name."""
    held_out = set(toy_held_out_combos())
    return [(c, s) for s in TOY_SHAPES for c in TOY_COLOURS if (c, s) not in held_out]


def toy_classname(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


class ToyLook(NamedTuple):
    """The nuisance of one image that a caption can put into words."""
    radius: float  # circumradius of the shape as a fraction of the image side, 0.26-0.44
    background: str  # one of TOY_BACKGROUNDS
    conditions: tuple[str, ...]  # a subset of TOY_CONDITIONS, never dark and bright, nor warm and cool


def sample_toy_look(rng: np.random.Generator, conditions: tuple[str, ...] | None = None) -> ToyLook:
    """Random size and background; conditions as given, else drawn as in pretraining: exposure
    dark/bright 12% each, colour cast warm/cool 12% each, blurry 15%, noisy 12%, independently."""
    radius, background = rng.uniform(0.26, 0.44), TOY_BACKGROUNDS[rng.integers(len(TOY_BACKGROUNDS))]
    if conditions is None:
        u = rng.random(4)  # (4,): exposure, cast, blur, noise
        conditions = tuple(c for c, keep in (("dark", u[0] < 0.12), ("bright", 0.12 <= u[0] < 0.24),
                                             ("warm", u[1] < 0.12), ("cool", 0.12 <= u[1] < 0.24),
                                             ("blurry", u[2] < 0.15), ("noisy", u[3] < 0.12)) if keep)
    return ToyLook(float(radius), str(background), tuple(conditions))


def toy_caption(colour: str, shape: str, look: ToyLook, rng: np.random.Generator) -> str:
    """A web-like caption: always the pair, often some of the nuisance, never all of it for sure.
    E.g. "a dark blurry photo of a small red triangle on a striped background." """
    named = [c for c in look.conditions if rng.random() < 0.75]
    size = "small " if look.radius < 0.32 else "large " if look.radius > 0.38 else ""
    size = size if rng.random() < 0.5 else ""
    where = f" on a {look.background} background" if rng.random() < 0.4 else ""
    return f"a {''.join(w + ' ' for w in named)}photo of a {size}{toy_classname(colour, shape)}{where}."


def _shape_polygons(shape: str) -> list[tuple[np.ndarray, int]]:
    """The shape as (polygon (P, 2), fill) pairs drawn in order, fill 255 = shape, 0 = hole; the
    shape has circumradius about 1 around the origin, y pointing down."""
    def regular(n, radii=(1.0,), rotate=-np.pi / 2, scale=1.0, shift=(0.0, 0.0)):
        angles = rotate + 2 * np.pi * np.arange(n) / n
        r = scale * np.array([radii[i % len(radii)] for i in range(n)])
        return np.stack([r * np.cos(angles) + shift[0], r * np.sin(angles) + shift[1]], axis=1)
    if shape == "circle":
        return [(regular(48), 255)]
    if shape == "triangle":
        return [(regular(3), 255)]
    if shape == "square":
        return [(regular(4, rotate=np.pi / 4), 255)]
    if shape == "star":
        return [(regular(10, radii=(1.0, 0.45)), 255)]  # alternating outer and inner corners
    if shape == "cross":
        a = 0.33  # half the arm width
        return [(np.array([(a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
                           (-1, a), (-1, -a), (-a, -a), (-a, -1)], dtype=np.float64), 255)]
    if shape == "heart":  # the classic parametric heart, scaled to fit the unit disc
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(np.stack([x, y + 2.5], axis=1) / 16.5, 255)]
    if shape == "ring":
        return [(regular(48), 255), (regular(48, scale=0.55), 0)]
    if shape == "crescent":  # a disc with an offset disc cut out
        return [(regular(48), 255), (regular(48, scale=0.85, shift=(0.45, -0.1)), 0)]
    raise DataError(f"unknown toy shape {shape!r}; choose one of {', '.join(TOY_SHAPES)}")


@lru_cache()
def _grid(size: int) -> np.ndarray:
    """(2, S, S): row and column coordinates / size, in [0, 1)."""
    return np.mgrid[0:size, 0:size] / size


def _toy_background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float: a muted colour with stripes, blotches or a checkerboard on it."""
    base = rng.uniform(50, 200) + rng.normal(0, 18, size=3)  # (3,) greyish, slightly tinted
    yy, xx = _grid(size)  # (S, S) each, in [0, 1)
    if kind == "striped":  # random direction and frequency
        angle, freq = rng.uniform(0, np.pi), rng.uniform(1.5, 5)
        texture = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    elif kind == "blotchy":  # 4 x 4 noise upsampled smoothly
        coarse = Image.fromarray(rng.normal(0, 1, size=(4, 4)).astype(np.float32), mode="F")
        texture = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float64)
    else:  # checkered, random cell size
        cell = rng.integers(3, 9)
        texture = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2) * 2.0 - 1
    tint = rng.normal(0, 1, size=3)  # (3,) the texture is coloured too
    return base + rng.uniform(8, 35) * texture[..., None] * (1 + 0.3 * tint)  # (S, S, 3)


def render_toy_image(colour: str, shape: str, look: ToyLook, rng: np.random.Generator,
                     size: int = TOY_SIZE) -> np.ndarray:
    """One (size, size, 3) uint8 image of a `colour` `shape` with `look`; the rest of the nuisance
    (position, rotation, jitter, lighting, noise) comes from `rng`."""
    background = _toy_background(look.background, rng, size)
    radius = look.radius * size
    centre = rng.uniform(radius, size - radius, size=2)  # fully inside the image
    theta = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    # Antialiased mask: drawn 4x larger, then box-averaged down to alpha in [0, 1].
    big = Image.new("L", (4 * size, 4 * size), 0)
    for polygon, fill in _shape_polygons(shape):
        points = polygon @ rotation.T * radius + centre  # (P, 2) in pixels
        ImageDraw.Draw(big).polygon([(4 * x, 4 * y) for x, y in points], fill=fill)
    alpha = np.asarray(big.resize((size, size), Image.BOX), dtype=np.float64)[..., None] / 255  # (S, S, 1)
    # The shape's colour: per-channel jitter and a brightness factor, then lighting over the image.
    paint = np.array(TOY_COLOURS[colour], dtype=np.float64) * rng.uniform(0.8, 1.15) + rng.normal(0, 12, size=3)
    image = background * (1 - alpha) + paint * alpha  # (S, S, 3)
    yy, xx = _grid(size) - 0.5
    light_angle = rng.uniform(0, 2 * np.pi)
    image = image * (1 + rng.uniform(0, 0.35) * (xx * np.cos(light_angle) + yy * np.sin(light_angle)))[..., None]
    # Photo conditions: the light's colour, exposure, optics, then sensor noise (stronger if "noisy").
    # A warm cast turns teal towards green, purple towards red, pink towards orange: the hue a
    # colour word names moves, so a prompt that does not know the light is misaligned.
    if "warm" in look.conditions:
        image = image * (1 + rng.uniform(0.8, 1.0) * np.array([0.3, 0.0, -0.5]))
    if "cool" in look.conditions:
        image = image * (1 + rng.uniform(0.8, 1.0) * np.array([-0.35, -0.05, 0.3]))
    if "dark" in look.conditions:
        image = image * rng.uniform(0.35, 0.5)
    if "bright" in look.conditions:
        image = image + (255 - image) * rng.uniform(0.35, 0.5)
    if "blurry" in look.conditions:
        sharp = Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8))
        image = np.asarray(sharp.filter(ImageFilter.GaussianBlur(rng.uniform(0.9, 1.3))), dtype=np.float64)
    noise = rng.uniform(18, 28) if "noisy" in look.conditions else rng.uniform(2, 8)
    image = image + rng.normal(0, noise, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def toy_rng(seed: int, *keys: int) -> np.random.Generator:
    """The generator of one image, keyed by (seed, split, class, index): independent of order."""
    return np.random.default_rng([seed, *keys])


def make_toy_dataset(root: str, n_train: int = 32, n_val: int = 8, n_test: int = 50, seed: int = 0) -> str:
    """Write the toy benchmark `<root>/toy/{train,val,test}/<class folder>/*.png` + classnames.txt.

    8 base classes (folders base_00_... to base_07_..., toy_base_combos: seen in pretraining) and
    8 new classes (new_00_... to new_07_..., toy_new_combos: held out of pretraining); every image
    is in the benchmark's domain (TOY_BENCHMARK_CONDITIONS: warm, dark, noisy). Sorted folders put
    base first, so subsample()'s first ceil(n/2) labels are exactly the base classes.
    Deterministic: each image is a function of (seed, split, class, index) through numpy's PCG64
    streams and PIL drawing, so the same arguments and numpy/Pillow versions give the same images
    (other versions may differ in the last bit of a pixel). n_train = 32 allows 16 shots; a split
    of 0 images is left out. Returns `<root>/toy`.
    """
    out = os.path.join(root, "toy")
    classes = [(f"base_{i:02d}_{c}_{s}", c, s) for i, (c, s) in enumerate(toy_base_combos())]
    classes += [(f"new_{i:02d}_{c}_{s}", c, s) for i, (c, s) in enumerate(toy_new_combos())]
    tmp = f"{out}.{os.getpid()}.part"  # written aside, then renamed: never half a dataset, nor two mixed
    for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        for class_id, (folder, colour, shape) in enumerate(classes if n > 0 else []):  # n = 0: no folder
            class_dir = os.path.join(tmp, split, folder)
            os.makedirs(class_dir, exist_ok=True)
            for i in range(n):
                rng = toy_rng(seed, split_id, class_id, i)
                image = render_toy_image(colour, shape, sample_toy_look(rng, TOY_BENCHMARK_CONDITIONS), rng)
                Image.fromarray(image).save(os.path.join(class_dir, f"{i:03d}.png"), compress_level=1)
    with open(os.path.join(tmp, "classnames.txt"), "w") as f:
        f.writelines(f"{folder} {toy_classname(c, s)}\n" for folder, c, s in classes)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same (deterministic) dataset first: keep its copy
        shutil.rmtree(tmp)
        if not os.path.isdir(out):
            raise
    return out
