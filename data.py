"""Datasets, splits, few-shot sampling, base/new subsampling and transforms for CLIP prompt tuning.

What this file does
  read_splits(root, dataset)   -> {"train", "val", "test"} lists of Item(path, label, classname)
  few_shot(train, val, shots, seed) -> `shots` train images per class, min(shots, 4) val images
  subsample(splits, "base")    -> first ceil(n/2) sorted labels (or "new": the rest), relabelled from 0
  ImageDataset(items, transform, cache) -> (image tensor, label, index)
  load_splits(dataset, root, shots, seed) -> what a run trains and tests on: the few-shot draw, its base/new views

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
few-shot sets equal the published ones (Dassl caches them as split_fewshot/shot_<shots>-seed_<seed>.pkl).

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
import stat
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

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
# CoOp's names for the same datasets (its configs/datasets/<name>.yaml) where ours differ: CoOp users type them.
DATASET_ALIASES = {"imagenetv2": "imagenet_v2"}


def dataset_name(name: str) -> str:
    """The name a run records for --data / --target `name`: ours, for one of CoOp's config names
    (DATASET_ALIASES); any other name as given."""
    return DATASET_ALIASES.get(name, name)


# ----------------------------------------------------------------------------------------------
# Reading splits

def read_splits(root: str, dataset: str) -> dict[str, list[Item]]:
    """Read train/val/test for `dataset` under `root`; "val" may be empty (ImageNet, no val/ folder;
    the CROSS_DOMAIN test sets, whose train and test are both every image).

    A known dataset is read from its CoOp layout when present, otherwise from an ImageFolder tree
    in the same folder; any other name is read as an ImageFolder tree `<root>/<dataset>/`. CoOp's
    config names are read as the datasets they name (DATASET_ALIASES).
    """
    dataset = dataset_name(dataset)
    info = DATASETS.get(dataset)
    folder = os.path.join(root, info.folder if info else dataset)
    if not os.path.isdir(folder):
        raise DataError(f"dataset folder {folder} not found: expected {_expected_layouts(root, dataset)}; "
                        f"pass --root (known datasets: {', '.join(DATASETS)})")
    layout = info.layout if info else None
    if layout == "split_json" and _is_file(os.path.join(folder, info.split_file)):
        splits = _read_split_json(os.path.join(folder, info.split_file), os.path.join(folder, info.image_dir), folder)
    elif layout == "aircraft" and _is_file(os.path.join(folder, "variants.txt")):
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


def _read_split_json(path: str, image_dir: str, folder: str) -> dict[str, list[Item]]:
    """CoOp's split_zhou JSON: {"train"|"val"|"test": [[relative_path, label, classname], ...]}, paths
    relative to `image_dir`. A downloaded file is not the user's own: an entry outside the dataset
    `folder` is refused (_outside), and a path must be encodable as a file name."""
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
                os.fsencode(rel_path)   # UnicodeEncodeError (a ValueError): a JSON "\ud800" names no file
            except (TypeError, ValueError) as e:
                raise DataError(f"{name}: entry {i} of '{split}' is {entry!r}, "
                                f"expected [path, int label >= 0, classname]") from e
            if _outside(folder, image_dir, rel_path):
                raise DataError(f"{name}: entry {i} of '{split}' is {rel_path!r}, outside the dataset folder {folder} "
                                f"(absolute, or climbing out with '..'): paths must be relative to {image_dir}; "
                                f"re-download {name} from the links in CoOp's DATASETS.md")
            items.append(Item(os.path.join(image_dir, rel_path), label, readable_name(classname)))
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
        if not _is_file(path):
            raise DataError(f"{path} not found: FGVCAircraft needs images_variant_{{train,val,test}}.txt "
                            f"from fgvc-aircraft-2013b/data in {folder}")
        items = []
        for number, line in enumerate(read_text_lines(path), 1):
            if not line.strip():
                continue
            image_id, _, classname = line.strip().partition(" ")
            if classname not in label_of:
                raise DataError(f"{path}: variant {classname!r} is not in variants.txt; use the files "
                                f"from the same fgvc-aircraft release")
            if _outside(folder, os.path.join(folder, "images"), image_id + ".jpg"):
                raise DataError(f"{path}: line {number} of '{split}' names image {image_id!r}, outside the dataset "
                                f"folder {folder}: image ids are file names in images/; use the files of the "
                                f"fgvc-aircraft release")
            items.append(Item(os.path.join(folder, "images", image_id + ".jpg"), label_of[classname], classname))
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
    if not _is_file(path):
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
    if not _is_file(path):
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


def _is_file(path: str) -> bool:
    """True for a regular file (or a link to one), False when nothing is there. Anything else there is
    refused: opening a FIFO blocks until a writer appears, i.e. forever, and a folder or a device named
    like a split file or a class-name list is a mistake to report, not a missing file."""
    if os.path.isfile(path):
        return True
    if not os.path.exists(path):
        return False
    mode = os.stat(path).st_mode
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise DataError(f"{path} is {kind}, not a regular file: put the file itself there")


def _outside(folder: str, base: str, rel_path: str) -> bool:
    """Whether `rel_path`, relative to `base` inside the dataset `folder` and taken from a file the user
    did not write (a split JSON, FGVCAircraft's lists), points outside `folder`: an absolute path, or
    one whose '..' climb out. normpath, not realpath: a symlink inside the dataset that points elsewhere
    is the user's own choice (datasets are often linked in), and '..' that stays inside is harmless."""
    if os.path.isabs(rel_path):
        return True
    if ".." not in rel_path:   # the common case, without a path operation per image
        return False
    top = os.path.abspath(folder)
    return os.path.commonpath([top, os.path.abspath(os.path.join(base, rel_path))]) != top


def readable_name(folder: str) -> str:
    """A folder name as the text of a class name in the prompts, also when the name is not UTF-8.

    Python decodes file names as UTF-8 and keeps each byte that is not UTF-8 as a lone surrogate
    U+DC80-U+DCFF (PEP 383), which opens the file but no tokenizer can encode. Such bytes usually come
    from a zip made on Windows, in its Western code page, so each is read as Windows-1252 (b"caf\xe9"
    gives "café"; a byte cp1252 leaves undefined, and any other lone surrogate, gives U+FFFD). A guess:
    name the class in classnames.txt to choose its name. Paths keep the name on disk."""
    try:
        folder.encode("utf-8")
        return folder
    except UnicodeEncodeError:
        pass
    chars = []
    for ch in folder:
        if "\udc80" <= ch <= "\udcff":
            ch = bytes([ord(ch) - 0xDC00]).decode("cp1252", errors="replace")
        elif "\ud800" <= ch <= "\udfff":
            ch = "\ufffd"
        chars.append(ch)
    return "".join(chars)


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


def _folder_classname(folder: str, names: dict[str, str]) -> str | None:
    """A class folder's name in the prompts: its classnames.txt line, found by the folder's name or, for
    a name that is not UTF-8, by its readable_name (the only form a UTF-8 classnames.txt can spell);
    without classnames.txt, the readable name. None: classnames.txt has no line for the folder."""
    if not names:
        return readable_name(folder)
    return names.get(folder, names.get(readable_name(folder)))


def _read_tree(split_dirs: dict[str, str | None], names: dict[str, str]) -> dict[str, list[Item]]:
    """Read ImageFolder splits; labels come from train's sorted class folders, shared by val/test.
    Item paths keep the folder names on disk (surrogate-escaped if not UTF-8); class names are text."""
    train_classes = _class_folders(split_dirs["train"])
    label_of = {c: i for i, c in enumerate(train_classes)}
    name_of = {c: _folder_classname(c, names) for c in train_classes}
    if names:
        missing = [readable_name(c) for c in train_classes if name_of[c] is None]
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
        splits[split] = [Item(p, label_of[c], name_of[c])
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
    """`shots` images per class from train and min(shots, 4) from val, over ALL classes (before subsample).

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

    Each split keeps only the chosen labels, relabelled from 0 (new label y -> y - m), so each group
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


def augmented_images(pool: ImageDataset, indices: list[int], threads=None) -> list[torch.Tensor]:
    """pool[j] for j in indices with the pool's train augmentation, each (3, H, W), as a serial loop would
    give them: the random views are drawn here, in order, from torch's RNG; decoding and rendering (crop,
    resize, normalise) run on `threads` (a ThreadPoolExecutor, or None), since PIL releases the GIL.
    train_dpc.py loads its sampled negatives so."""
    run = threads.map if threads is not None else map
    if pool.images is not None:                                        # few-shot pool: decoded once
        images = [pool.images[j] for j in indices]
    else:
        images = list(run(load_image, [pool.items[j].path for j in indices]))
    views = [pool.transform.draw(image) for image in images]           # serial: the RNG order is fixed
    return list(run(pool.transform.render, images, views))

# ----------------------------------------------------------------------------------------------
# What a run loads: its few-shot splits and their loaders


def load_splits(dataset: str, root: str, shots: int, seed: int) -> dict[str, dict[str, list[Item]]]:
    """A run's splits: the few-shot draw over all classes (Dassl's order, so few-shot sets equal the
    published ones), then the base/new views of it. `--data toy` / `--data synthetic` are generated
    under `root` on first use (toy_world.py).

    Returns {"all", "base", "new", "unsampled"}, each {"train", "val", "test"}: "all" / "base" / "new"
    are the few-shot sets over all classes / the base half / the new half (as --subsample names them);
    "unsampled" is the dataset before the few-shot draw (--negative-pool full). The few-shot val set is
    drawn as Dassl draws it, so the train draw and the split files stay Dassl's, but no stage selects on
    it: every run reports its last epoch (docs/differences.md #4)."""
    if dataset in ("synthetic", "toy") and not os.path.isdir(os.path.join(root, dataset)):
        import toy_world   # generators only; a reader of the protocol never needs them
        if dataset == "synthetic":
            toy_world.make_synthetic_imagefolder(root, "synthetic")
        else:
            toy_world.make_toy_dataset(root)   # the toy world's benchmark split, ~5 s
    splits = read_splits(root, dataset)
    train, val = few_shot(splits["train"], splits["val"], shots, seed) if shots > 0 else (splits["train"], splits["val"])
    counts = {}
    for item in splits["train"]:
        counts[item.classname] = counts.get(item.classname, 0) + 1
    short = sorted((n, name) for name, n in counts.items() if n < shots)
    if short:  # Dassl takes all images of such a class, without repeats: so do we, but say so once
        print(f"warning: --shots {shots}, but {len(short)} classes have fewer train images (fewest: {short[0][0]} "
              f"in '{short[0][1]}'); those classes use all their images", flush=True)
    fewshot = dict(splits, train=train, val=val)
    return {"all": fewshot, "base": subsample(fewshot, "base"), "new": subsample(fewshot, "new"),
            "unsampled": splits}


def check_halves(splits: dict, dataset: str, subsample: str) -> None:
    """Base-to-new needs two classes in each half: one class is always right (100%, and no negatives)."""
    n = {half: len(classnames_of(splits[half]["train"])) for half in ("base", "new")}
    if subsample == "base" and min(n.values()) < 2:
        raise DataError(f"{dataset} has {n['base'] + n['new']} classes: base-to-new needs at least 4 (2 base, "
                        f"2 new), since a half of one class is always right; add classes or pass --subsample all")


def train_set(items: list[Item], image_size: int) -> ImageDataset:
    """Training images with train augmentation. Small sets (few-shot) are decoded once, here, and kept
    in memory: decoding never dominates a step, and an unreadable image stops the run before it starts."""
    return ImageDataset(items, train_transform(image_size), cache=len(items) <= 20000)


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0,
                drop_last: bool = False, pin: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader whose shuffle is seeded: a run (and a resumed run) draws the same batches. `pin` (a GPU
    run): batches in page-locked memory, so that .to(device, non_blocking=True) does not wait. A loader per
    epoch, its workers started anew: each epoch's augmentation is then seeded by (seed, epoch) alone, which
    --resume relies on (persistent workers would carry their random state over from earlier epochs)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       drop_last=drop_last and len(dataset) >= batch_size, generator=generator,
                                       persistent_workers=False, pin_memory=pin)
