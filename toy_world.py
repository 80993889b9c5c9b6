"""Generated datasets for offline runs and tests: the toy world and the synthetic smoke set.

Neither is the paper's benchmark; their numbers are not comparable to any published table.
  make_toy_dataset(root)            -> <root>/toy: 8 base + 8 new classes of coloured shapes, in which
                                       CLIP-style zero-shot transfer really happens (docs/toy_world.md);
                                       tools/pretrain_toy_clip.py pretrains the shipped toy CLIP on it
  make_synthetic_imagefolder(root)  -> <root>/synthetic: colour-stripe classes for smoke runs and tests
Both write the ImageFolder layout that data.read_splits reads; data.load_splits generates them on
first use of `--data toy` / `--data synthetic`.
"""
import os
import shutil
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


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
                               n_val: int = 4, n_test: int = 4, size: int = 32, seed: int = 0) -> str:
    """Write a small deterministic tree `<root>/<name>/{train,val,test}/class_XX/*.png` + classnames.txt.

    Class c is colour c % 20 with c // 20 + 1 stripes ("red stripes", ..., "red stripes 2"), plus
    per-image noise, so a model can separate the classes. val/ (test/) is skipped when n_val
    (n_test) is 0. Returns `<root>/<name>`. Written aside and renamed, as make_toy_dataset is: a run
    that finds the folder finds it whole, and of two first runs at once (`--data synthetic`) the one
    that finishes second keeps the first one's copy (an existing folder is never written into).
    """
    rs = np.random.RandomState(seed)
    out = os.path.join(root, name)
    width = max(2, len(str(n_classes - 1)))  # zero-padded so sorted folders = label order
    folders = [f"class_{i:0{width}d}" for i in range(n_classes)]
    colours = list(_COLOURS)
    tmp = f"{out}.{os.getpid()}.part"
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "classnames.txt"), "w") as f:
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
            class_dir = os.path.join(tmp, split, folder)
            os.makedirs(class_dir, exist_ok=True)
            for i in range(n):
                Image.fromarray(images[i]).save(os.path.join(class_dir, f"{i}.png"), compress_level=1)
    return _move_into_place(tmp, out)


def _move_into_place(tmp: str, out: str) -> str:
    """Rename a generated folder to `out`; if another process got there first, keep its copy."""
    try:
        os.replace(tmp, out)
    except OSError:   # `out` exists and is not empty: the other process's (deterministic) copy
        shutil.rmtree(tmp)
        if not os.path.isdir(out):
            raise
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
# base classes cost new-class accuracy (docs/toy_world.md).
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
# what it learns does not carry over to the new classes (the Base-New Trade-off, docs/toy_world.md).
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
    raise ValueError(f"unknown toy shape {shape!r}; choose one of {', '.join(TOY_SHAPES)}")


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
    return _move_into_place(tmp, out)
