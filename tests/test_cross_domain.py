"""Tests for the cross-domain test sets of Tab. 2 (ImageNet-V2, -Sketch, -A, -R) in data.py: small
trees of CoOp's DATASETS.md layout in tmp_path, read as CoOp's datasets/imagenetv2.py,
imagenet_sketch.py, imagenet_a.py and imagenet_r.py read them. CPU only, tiny PNGs."""

import os
import random

import pytest
from PIL import Image

from data import CROSS_DOMAIN, DATASETS, DataError, Item, classnames_of, read_splits

# The first 12 lines of ImageNet's classnames.txt: wnids in sorted order, readable names.
WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
         "n01491361": "tiger shark", "n01494475": "hammerhead", "n01496331": "electric ray",
         "n01498041": "stingray", "n01514668": "cock", "n01514859": "hen", "n01518878": "ostrich",
         "n01530575": "brambling", "n01531178": "goldfinch"}


def write_classnames(path, wnids: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{w} {WNIDS[w]}\n" for w in wnids)


def write_images(class_dir, names: list[str]) -> list[str]:
    """Tiny PNGs in `class_dir`, written in the given (unsorted) order; returns their sorted paths."""
    os.makedirs(class_dir, exist_ok=True)
    for name in names:
        Image.new("RGB", (4, 4), (10, 120, 200)).save(os.path.join(class_dir, name))
    return [os.path.join(class_dir, name) for name in sorted(names)]


def image_names(k: int) -> list[str]:
    """k file names out of sorted order ("c.png", "a.png", ...): the reader must sort them."""
    return [f"{'cabdef'[i]}.png" for i in range(k)]


def make_wnid_tree(root, dataset: str, wnids: list[str], with_readme: bool) -> dict[str, list[str]]:
    """<root>/<folder>/classnames.txt (all 12 lines, ImageNet order) + <image_dir>/<wnid>/*.png for the
    given wnids (created in the given order), plus README.txt and a hidden folder that are no classes."""
    info = DATASETS[dataset]
    folder = os.path.join(root, info.folder)
    write_classnames(os.path.join(folder, "classnames.txt"), sorted(WNIDS))
    image_dir = os.path.join(folder, info.image_dir)
    paths = {w: write_images(os.path.join(image_dir, w), image_names(1 + i % 3)) for i, w in enumerate(wnids)}
    if with_readme:
        with open(os.path.join(image_dir, "README.txt"), "w") as f:
            f.write("ImageNet-A/R: 200 classes, a subset of ImageNet-1k.\n")
    write_images(os.path.join(image_dir, ".ipynb_checkpoints"), ["x.png"])
    return paths


# ---------------------------------------------------------------------------------------------
# Registry

def test_cross_domain_registry():
    assert CROSS_DOMAIN == ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    expected = {"imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", "ImageNetV2"),
                "imagenet_sketch": ("imagenet-sketch", "images", "ImageNetSketch"),
                "imagenet_a": ("imagenet-adversarial", "imagenet-a", "ImageNetA"),
                "imagenet_r": ("imagenet-rendition", "imagenet-r", "ImageNetR")}
    for name in CROSS_DOMAIN:
        info = DATASETS[name]
        assert (info.folder, info.image_dir, info.display_name) == expected[name]
        assert info.name == name and info.split_file is None
        assert info.template.format("tench") == "a photo of a tench."


# ---------------------------------------------------------------------------------------------
# The four readers

@pytest.mark.parametrize("dataset", ["imagenet_a", "imagenet_r"])
def test_imagenet_a_r_sorted_subset(tmp_path, dataset):
    subset = ["n01531178", "n01443537", "n01514859", "n01491361", "n01498041"]  # 5 of 12, unsorted
    paths = make_wnid_tree(str(tmp_path), dataset, subset, with_readme=True)
    splits = read_splits(str(tmp_path), dataset)
    order = sorted(subset)  # labels 0..4 over the SORTED subset, not classnames.txt's 12 lines
    expected = [Item(p, label, WNIDS[w]) for label, w in enumerate(order) for p in paths[w]]
    assert splits["test"] == expected
    assert splits["train"] == expected and splits["val"] == []
    assert classnames_of(splits["test"]) == ["goldfish", "tiger shark", "stingray", "hen", "goldfinch"]


def test_imagenet_sketch_labels_follow_sorted_folders(tmp_path):
    wnids = list(WNIDS)
    random.Random(0).shuffle(wnids)
    paths = make_wnid_tree(str(tmp_path), "imagenet_sketch", wnids, with_readme=False)
    # classnames.txt in another order: Sketch's labels come from the sorted folders, names by wnid.
    write_classnames(str(tmp_path / "imagenet-sketch" / "classnames.txt"), wnids)
    splits = read_splits(str(tmp_path), "imagenet_sketch")
    expected = [Item(p, label, WNIDS[w]) for label, w in enumerate(sorted(WNIDS)) for p in paths[w]]
    assert splits["test"] == expected and splits["train"] == expected and splits["val"] == []
    assert classnames_of(splits["test"]) == list(WNIDS.values())
    assert os.path.dirname(splits["test"][0].path) == str(tmp_path / "imagenet-sketch" / "images" / "n01440764")
    hen = [os.path.basename(it.path) for it in splits["test"] if it.classname == "hen"]
    assert hen == ["a.png", "b.png", "c.png"]  # written c, a, b (3 images: 3rd in the shuffle): sorted


def test_imagenet_v2_label_is_folder_index_and_line(tmp_path):
    lines = list(WNIDS)
    random.Random(1).shuffle(lines)  # line i names label i, whatever the wnids' alphabetical order
    folder = tmp_path / "imagenetv2"
    write_classnames(str(folder / "classnames.txt"), lines)
    image_dir = folder / "imagenetv2-matched-frequency-format-val"
    paths = [write_images(str(image_dir / str(i)), image_names(1 + i % 3)) for i in range(len(lines))]
    splits = read_splits(str(tmp_path), "imagenet_v2")
    # label order 0, 1, ..., 9, 10, 11 (CoOp's range loop), not the string order "0", "1", "10", "11", "2"
    expected = [Item(p, i, WNIDS[lines[i]]) for i in range(len(lines)) for p in paths[i]]
    assert splits["test"] == expected and splits["train"] == expected and splits["val"] == []
    assert classnames_of(splits["test"]) == [WNIDS[w] for w in lines]
    assert classnames_of(splits["test"]) != list(WNIDS.values())  # the shuffle did change the names


# ---------------------------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("dataset", CROSS_DOMAIN)
def test_missing_classnames_txt(tmp_path, dataset):
    info = DATASETS[dataset]
    write_images(str(tmp_path / info.folder / info.image_dir / "0"), ["a.png"])
    with pytest.raises(DataError, match=r"classnames\.txt not found: .*ImageNet's classnames\.txt") as e:
        read_splits(str(tmp_path), dataset)
    message = str(e.value)
    assert "\n" not in message and info.display_name in message
    assert f"expected {tmp_path / info.folder}/ with ImageNet's classnames.txt + {info.image_dir}/" in message


@pytest.mark.parametrize("dataset", ["imagenet_sketch", "imagenet_a", "imagenet_r"])
def test_wnid_folder_missing_from_classnames(tmp_path, dataset):
    make_wnid_tree(str(tmp_path), dataset, ["n01443537", "n01491361"], with_readme=True)
    info = DATASETS[dataset]
    write_images(str(tmp_path / info.folder / info.image_dir / "n09999999"), ["a.png"])
    with pytest.raises(DataError, match=r"class folder\(s\) n09999999 of .* have no line in .*classnames\.txt: "
                                        r".*1000-class classnames\.txt; expected .*<wnid>/"):
        read_splits(str(tmp_path), dataset)


def test_imagenet_v2_missing_label_folder(tmp_path):
    folder = tmp_path / "imagenetv2"
    write_classnames(str(folder / "classnames.txt"), list(WNIDS))
    image_dir = folder / "imagenetv2-matched-frequency-format-val"
    for i in range(len(WNIDS)):
        if i != 7:
            write_images(str(image_dir / str(i)), ["a.png"])
    with pytest.raises(DataError, match=r"lacks label folder\(s\) 7: ImageNetV2 needs one folder per line of "
                                        r"classnames\.txt \(12 lines\), named 0\.\.11"):
        read_splits(str(tmp_path), "imagenet_v2")
    write_images(str(image_dir / "7"), ["a.png"])
    write_images(str(image_dir / "12"), ["a.png"])  # a 13th class: classnames.txt is not the full file
    with pytest.raises(DataError, match=r"folder\(s\) 12 that are not label indices 0\.\.11"):
        read_splits(str(tmp_path), "imagenet_v2")


@pytest.mark.parametrize("dataset", CROSS_DOMAIN)
def test_missing_cross_domain_folder_names_layout(tmp_path, dataset):
    info = DATASETS[dataset]
    with pytest.raises(DataError, match="not found") as e:
        read_splits(str(tmp_path), dataset)
    assert f"{info.image_dir}/<" in str(e.value) and "classnames.txt" in str(e.value)
    (tmp_path / info.folder).mkdir()  # the folder, but not its image folder
    with pytest.raises(DataError, match=f"unknown layout .*{info.image_dir}/<"):
        read_splits(str(tmp_path), dataset)
