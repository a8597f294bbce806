"""Procedural captioned scenes: the project's own image-to-sentence training data.

No captioned photo set of trainable size can ship with the project, so this module draws one. Each
scene is a 64x64 RGB image holding one to three shapes on a noisy, shaded background; each shape sits
in its own cell of a 3x3 grid and has a kind, a colour and a size. The caption lists the shapes in
reading order (top row first, left to right) with a small grammar::

    a large red circle at the top left , a small blue triangle in the centre and a ...

Everything is a pure function of the seed: ``make_scene(seed)`` always draws the same pixels and
caption, on any machine (numpy's PCG64 and Pillow's integer rasteriser are deterministic).

Compositional split: ``HELD_OUT_PAIRS`` are (colour, kind) pairs never drawn in training scenes;
the "unseen combinations" test part puts at least one of them in every scene, so it measures whether
the model composes a colour and a shape it has only seen apart (cf. Johnson et al. 2017, CLEVR CoGenT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x then box-filtered down: anti-aliased edges, still deterministic
GRID = 3
KINDS = ("circle", "square", "triangle", "diamond")
COLOURS = {  # nominal RGB; every drawn shape jitters around it
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
}
SIZES = {"small": (0.42, 0.55), "large": (0.78, 0.95)}  # shape extent as a fraction of a grid cell
# Row-major cell index -> position phrase. The tokenizer turns these into the caption's words.
POSITIONS = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the centre", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
POSITION_NAMES = (
    "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right",
)
# Each colour and each kind still appears in training, only not together.
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "diamond"),
                            ("yellow", "square"), ("purple", "triangle")})
SPLITS = ("train", "val", "test_fresh", "test_unseen")
ATTRIBUTES = ("shape", "colour", "size", "position")
# Disjoint seed ranges per split, so no test scene can repeat a training scene by construction.
_SPLIT_OFFSET = {"train": 0, "val": 10_000_000, "test_fresh": 20_000_000, "test_unseen": 30_000_000}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: int  # 0..8, row-major in the 3x3 grid

    @property
    def position(self) -> str:
        return POSITION_NAMES[self.cell]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {POSITIONS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (64, 64, 3) uint8
    shapes: tuple[Shape, ...]  # in caption order
    caption: str


def caption_for(shapes: tuple[Shape, ...]) -> str:
    """Joins the shape phrases: "A", "A and B", "A , B and C"."""
    phrases = [shape.phrase() for shape in shapes]
    if len(phrases) == 1:
        return phrases[0]
    return " , ".join(phrases[:-1]) + " and " + phrases[-1]


def _sample_shapes(rng: np.random.Generator, split: str) -> tuple[Shape, ...]:
    count = int(rng.integers(1, 4))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=count, replace=False))
    colours, kinds = list(COLOURS), list(KINDS)
    shapes = []
    for cell in cells:
        while True:
            colour = colours[int(rng.integers(len(colours)))]
            kind = kinds[int(rng.integers(len(kinds)))]
            held_out = (colour, kind) in HELD_OUT_PAIRS
            if split != "test_unseen" and held_out:
                continue  # train/val/fresh never hold a held-out pair
            break
        shapes.append(Shape(kind, colour, str(rng.choice(list(SIZES))), cell))
    if split == "test_unseen" and not any((s.colour, s.kind) in HELD_OUT_PAIRS for s in shapes):
        # Force one held-out pair onto a random shape of the scene.
        index = int(rng.integers(len(shapes)))
        pairs = sorted(HELD_OUT_PAIRS)
        colour, kind = pairs[int(rng.integers(len(pairs)))]
        old = shapes[index]
        shapes[index] = Shape(kind, colour, old.size, old.cell)
    return tuple(shapes)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A shaded grey-ish background: random base tone, a linear gradient and a slight tint."""
    base = rng.uniform(20, 110)
    tint = rng.uniform(-12, 12, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0, 40)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys) * strength
    return np.clip(base + ramp[..., None] + tint, 0, 255)  # (S, S, 3) float


def _draw(draws: tuple[ImageDraw.ImageDraw, ImageDraw.ImageDraw], shape: Shape,
          rng: np.random.Generator, scale: int) -> None:
    """Draws ``shape`` on the colour layer and, in white, on the coverage mask."""
    cell = IMAGE_SIZE / GRID * scale
    low, high = SIZES[shape.size]
    extent = rng.uniform(low, high) * cell
    row, col = divmod(shape.cell, GRID)
    slack = cell - extent  # jitter the centre inside the cell so the shape never leaves it
    cx = col * cell + extent / 2 + rng.uniform(0.1, 0.9) * slack
    cy = row * cell + extent / 2 + rng.uniform(0.1, 0.9) * slack
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[shape.colour])
    r = extent / 2
    for draw, fill in zip(draws, (colour, 255), strict=True):
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape.kind == "square":
            side = r * 0.9  # a square of the same extent looks bigger than a circle; even them out
            draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def _rng(seed: int, split: str) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return np.random.default_rng([seed, _SPLIT_OFFSET[split]])


def scene_shapes(seed: int, split: str = "train") -> tuple[Shape, ...]:
    """The shapes of ``make_scene(seed, split)`` without drawing it (the same first draws)."""
    return _sample_shapes(_rng(seed, split), split)


def make_scene(seed: int, split: str = "train") -> Scene:
    """Draws scene ``seed`` of ``split``: a deterministic function of both arguments."""
    rng = _rng(seed, split)
    shapes = _sample_shapes(rng, split)
    big = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (0, 0, 0))
    mask = Image.new("L", (big, big), 0)
    draws = (ImageDraw.Draw(canvas), ImageDraw.Draw(mask))
    for shape in shapes:
        _draw(draws, shape, rng, SUPERSAMPLE)
    # Box-filtering the black-backed colour layer gives premultiplied colour (shapes never overlap:
    # one per cell), so compositing is colour + (1 - coverage) * background.
    small = np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float64)
    coverage = np.asarray(mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX),
                          dtype=np.float64)[..., None] / 255.0  # (S, S, 1)
    image = small + (1 - coverage) * _background(rng, IMAGE_SIZE)
    image = image + rng.normal(0, rng.uniform(0, 10), size=image.shape)  # sensor-like noise
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Scene(pixels, shapes, caption_for(shapes))


def make_scenes(count: int, split: str, start: int = 0) -> list[Scene]:
    """Scenes ``start .. start + count - 1`` of ``split``."""
    return [make_scene(seed, split) for seed in range(start, start + count)]


def parse_caption(caption: str) -> list[dict[str, str]] | None:
    """Inverts ``caption_for``: one attribute dict per shape phrase, or None if the text is off-grammar.

    >>> parse_caption("a small red circle at the top and a large blue square in the centre")
    [{'size': 'small', 'colour': 'red', 'shape': 'circle', 'position': 'top'}, \
{'size': 'large', 'colour': 'blue', 'shape': 'square', 'position': 'centre'}]
    """
    words = caption.replace(",", " , ").split()
    phrases: list[list[str]] = [[]]
    for word in words:
        if word in (",", "and"):
            phrases.append([])
        else:
            phrases[-1].append(word)
    out = []
    position_of = {phrase: name for phrase, name in zip(POSITIONS, POSITION_NAMES, strict=True)}
    for phrase in phrases:
        if len(phrase) < 6 or phrase[0] != "a":
            return None
        size, colour, kind, where = phrase[1], phrase[2], phrase[3], " ".join(phrase[4:])
        if size not in SIZES or colour not in COLOURS or kind not in KINDS or where not in position_of:
            return None
        out.append({"size": size, "colour": colour, "shape": kind, "position": position_of[where]})
    return out


def attribute_matches(predicted: str, shapes: tuple[Shape, ...]) -> dict[str, tuple[int, int]]:
    """Per attribute: (correct, total) over the true shapes, comparing phrase i with shape i.

    An off-grammar caption scores zero; a missing phrase scores zero for that shape; an extra phrase
    costs nothing here (exact match and BLEU catch it).
    """
    parsed = parse_caption(predicted) or []
    counts = {}
    for attribute in ATTRIBUTES:
        correct = 0
        for index, shape in enumerate(shapes):
            truth = {"shape": shape.kind, "colour": shape.colour, "size": shape.size,
                     "position": shape.position}[attribute]
            correct += int(index < len(parsed) and parsed[index][attribute] == truth)
        counts[attribute] = (correct, len(shapes))
    return counts
