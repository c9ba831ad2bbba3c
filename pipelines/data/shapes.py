"""The Shapes world: a seedable generator of captioned videos whose semantics can be checked exactly.

A scene is one moving-or-static object (75%) or two static objects side by side (25%) on a plain
background. Everything is drawn analytically (anti-aliased coverage), so a video is a pure function of
its `Scene`. Captions come from a small grammar with synonyms and optional parts; `parse_prompt`
reads any caption (or a user prompt in the same vocabulary) back into the attributes it states, which
is what the judge (`pipelines/eval/judge.py`) scores and what `scene_for_prompt` renders.

Tensor conventions: `ShapesWorld.render` returns uint8 frames [T, H, W, 3] (RGB, 0..255);
`ShapesVideoDataset` yields float videos [3, T, H, W] in [-1, 1] with their caption.
Positions are fractions of the canvas (x of the width, y of the height, origin top-left).

Held-out split: the combinations in `HELDOUT_COLOUR_SHAPE` and `HELDOUT_COLOUR_MOTION` never occur
in a `split="train"` scene; every `split="heldout"` scene has at least one object with such a
combination and its caption always states both attributes of that combination.
See docs/shapes_world.md for the full grammar and the judge definitions.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from neodragon_cli.errors import UsageError

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (10, 10, 10), "gray": (110, 110, 110), "navy": (20, 25, 70)}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
#: Bounding-box width as a fraction of the canvas's short side.
SIZES: dict[str, float] = {"small": 0.20, "large": 0.36}
MOTIONS = ("left", "right", "up", "down", "static")
#: Unit direction of each motion in (x, y) canvas fractions (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0)}
#: How far a moving object's centre travels over the clip, as a fraction of the canvas along its axis.
TRAVEL = 0.5
ONE_OBJECT_PROBABILITY = 0.75
#: Horizontal gap kept between the two objects of a two-object scene (fraction of the width).
PAIR_GAP = 0.04
SPLITS = ("train", "heldout", "all")

#: Compositional hold-out: these (colour, shape) and (colour, motion) pairs never appear in training.
HELDOUT_COLOUR_SHAPE = frozenset({("green", "triangle"), ("magenta", "square"), ("orange", "circle")})
HELDOUT_COLOUR_MOTION = frozenset({("blue", "up"), ("white", "down"), ("cyan", "right")})


@dataclass(frozen=True)
class ShapeObject:
    """One object: attributes plus its start centre (x, y) as canvas fractions."""

    shape: str
    colour: str
    size: str
    motion: str
    x: float
    y: float

    def heldout_pairs(self) -> list[tuple[str, str]]:
        """The attribute pairs of this object that belong to the held-out set, e.g. [("colour", "shape")]."""
        pairs = []
        if (self.colour, self.shape) in HELDOUT_COLOUR_SHAPE:
            pairs.append(("colour", "shape"))
        if (self.colour, self.motion) in HELDOUT_COLOUR_MOTION:
            pairs.append(("colour", "motion"))
        return pairs

    def centres(self, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Centre (x, y) per frame as canvas fractions: linear travel of TRAVEL along the motion axis."""
        dx, dy = DIRECTIONS[self.motion]
        progress = np.linspace(0.0, 1.0, frames)
        return self.x + dx * TRAVEL * progress, self.y + dy * TRAVEL * progress


@dataclass(frozen=True)
class Scene:
    """A whole clip's content. Two-object scenes list their objects left to right."""

    background: str
    objects: tuple[ShapeObject, ...]

    @property
    def split(self) -> str:
        return "heldout" if any(o.heldout_pairs() for o in self.objects) else "train"

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(data["background"], tuple(ShapeObject(**o) for o in data["objects"]))


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt states about one object; None = not stated (sampled at random, not judged)."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    motion: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """The attributes a prompt states. The object count is always stated (by the number of noun
    phrases). `ordered` means the prompt says which object is left; `objects` are then left to right."""

    objects: tuple[ObjectSpec, ...]
    background: str | None = None
    ordered: bool = False

    def judged(self) -> list[str]:
        """Names of the judged attributes: 'count', 'background', 'relation', 'object{i}.{attr}'."""
        names = ["count"]
        if self.background is not None:
            names.append("background")
        if self.ordered:
            names.append("relation")
        for i, obj in enumerate(self.objects):
            names += [f"object{i}.{a}" for a in ("shape", "colour", "size", "motion") if getattr(obj, a) is not None]
        return names


@dataclass(frozen=True)
class Caption:
    text: str
    spec: PromptSpec


# ----------------------------------------------------------------------------------------------
# Sampling scenes
# ----------------------------------------------------------------------------------------------


def _half_extent(size: str, height: int, width: int) -> tuple[float, float]:
    """Half of the object's bounding box in canvas fractions (x, y). A triangle's box is narrower in y,
    but using the full side keeps every shape's placement rule the same."""
    side = SIZES[size] * min(height, width)
    return side / 2 / width, side / 2 / height


def _check_split(split: str | None) -> str:
    split = "all" if split is None else split
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}'", hint=f"use one of {', '.join(SPLITS)}")
    return split


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _place_single(rng, size: str, motion: str, height: int, width: int) -> tuple[float, float]:
    """Start centre such that the whole object stays inside the canvas for the whole clip."""
    hx, hy = _half_extent(size, height, width)
    dx, dy = DIRECTIONS[motion]
    start = []
    for half, d in ((hx, dx), (hy, dy)):
        low, high = half, 1.0 - half
        if d < 0:
            low += TRAVEL
        elif d > 0:
            high -= TRAVEL
        start.append(float(rng.uniform(low, high)))
    return start[0], start[1]


def _place_pair(rng, sizes: tuple[str, str], height: int, width: int) -> list[tuple[float, float]]:
    """Two static objects: the first in the left half, the second in the right half, never touching."""
    (hx0, hy0), (hx1, hy1) = (_half_extent(s, height, width) for s in sizes)
    x0 = rng.uniform(hx0, 0.5 - PAIR_GAP / 2 - hx0)
    x1 = rng.uniform(0.5 + PAIR_GAP / 2 + hx1, 1.0 - hx1)
    return [(float(x0), float(rng.uniform(hy0, 1 - hy0))), (float(x1), float(rng.uniform(hy1, 1 - hy1)))]


def sample_scene(
    rng: np.random.Generator,
    split: str | None = "train",
    spec: PromptSpec | None = None,
    height: int = 128,
    width: int = 128,
) -> Scene:
    """A random scene of `split` ('train': no held-out pair; 'heldout': at least one; 'all'/None: any),
    consistent with every attribute `spec` states (unstated ones are drawn uniformly)."""
    split = _check_split(split)
    if spec is not None:
        if not 1 <= len(spec.objects) <= 2:
            raise UsageError(f"the Shapes world has one or two objects per scene, the prompt asks for {len(spec.objects)}")
        if len(spec.objects) == 2 and any(o.motion not in (None, "static") for o in spec.objects):
            raise UsageError("two-object Shapes scenes are static", hint="ask for one moving object, or two static ones")
        count = len(spec.objects)
        wanted = list(spec.objects)
    else:
        count = 1 if rng.random() < ONE_OBJECT_PROBABILITY else 2
        wanted = [ObjectSpec()] * count
        if split == "heldout":
            wanted = _force_heldout_pair(rng, wanted)
    for _ in range(1000):
        attrs = [
            dict(
                shape=w.shape or _pick(rng, SHAPES),
                colour=w.colour or _pick(rng, list(COLOURS)),
                size=w.size or _pick(rng, list(SIZES)),
                motion=w.motion or ("static" if count == 2 else _pick(rng, MOTIONS)),
            )
            for w in wanted
        ]
        if count == 2:
            if spec is None or not spec.ordered:
                order = rng.permutation(2)
                attrs = [attrs[int(i)] for i in order]
            positions = _place_pair(rng, (attrs[0]["size"], attrs[1]["size"]), height, width)
        else:
            positions = [_place_single(rng, attrs[0]["size"], attrs[0]["motion"], height, width)]
        background = (spec.background if spec else None) or _pick(rng, list(BACKGROUNDS))
        scene = Scene(background, tuple(ShapeObject(**a, x=x, y=y) for a, (x, y) in zip(attrs, positions)))
        if split == "all" or scene.split == split:
            return scene
    raise UsageError(f"no '{split}' scene matches the prompt's attributes", hint="state other attributes or use split 'all'")


def _force_heldout_pair(rng, wanted: list[ObjectSpec]) -> list[ObjectSpec]:
    """Give one object a held-out pair chosen uniformly (colour×motion only for single moving objects)."""
    pairs = [("shape", p) for p in sorted(HELDOUT_COLOUR_SHAPE)]
    if len(wanted) == 1:
        pairs += [("motion", p) for p in sorted(HELDOUT_COLOUR_MOTION)]
    kind, (colour, other) = pairs[int(rng.integers(len(pairs)))]
    index = int(rng.integers(len(wanted)))
    wanted = list(wanted)
    wanted[index] = replace(wanted[index], colour=colour, **{kind: other})
    return wanted


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


class ShapesWorld:
    """Canvas settings of the world; renders scenes to uint8 frames [T, H, W, 3]."""

    def __init__(self, height: int = 128, width: int = 128, frames: int = 49, fps: int = 24):
        if height % 64 or width % 64 or height <= 0 or width <= 0:
            raise UsageError(f"Shapes canvas sizes must be positive multiples of 64 px, got {height}x{width}")
        if frames < 2:
            raise UsageError(f"a Shapes clip needs at least 2 frames, got {frames}")
        self.height, self.width, self.frames, self.fps = height, width, frames, fps

    def sample_scene(self, rng: np.random.Generator, split: str | None = "train", spec: PromptSpec | None = None) -> Scene:
        """`sample_scene` on this canvas."""
        return sample_scene(rng, split, spec, self.height, self.width)

    def scene_for_prompt(self, prompt: str, rng: np.random.Generator) -> Scene:
        """A scene showing everything `prompt` states; unstated attributes are drawn at random."""
        spec = parse_prompt(prompt)
        if not spec.objects:
            raise UsageError(f"no shape found in the prompt '{prompt}'", hint="name a circle, square or triangle (or a synonym)")
        return self.sample_scene(rng, split="all", spec=spec)

    def render(self, scene: Scene, frames: int | None = None) -> np.ndarray:
        """Anti-aliased frames uint8 [T, H, W, 3]: each pixel blends towards an object's colour by the
        fraction of the pixel the object covers (box-filter coverage, computed analytically).
        `frames` renders only the clip's first frames (e.g. 1: its first image); default all."""
        height, width = self.height, self.width
        frames = self.frames if frames is None else min(frames, self.frames)
        canvas = np.empty((frames, height, width, 3), np.float32)
        canvas[:] = np.asarray(BACKGROUNDS[scene.background], np.float32)
        # Pixel centres in pixels, shaped to broadcast against per-frame centres [T, 1, 1].
        ys = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
        xs = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
        for obj in scene.objects:
            cx, cy = (c[:frames] for c in obj.centres(self.frames))
            cx = (cx * width).astype(np.float32)[:, None, None]
            cy = (cy * height).astype(np.float32)[:, None, None]
            side = SIZES[obj.size] * min(height, width)
            alpha = _COVERAGE[obj.shape](xs - cx, ys - cy, side)
            colour = np.asarray(COLOURS[obj.colour], np.float32)
            canvas += alpha[..., None] * (colour - canvas)
        return np.round(canvas).astype(np.uint8)

    def sample(self, rng: np.random.Generator, split: str | None = "train") -> tuple[Scene, Caption, np.ndarray]:
        """A random (scene, caption, frames) triple."""
        scene = self.sample_scene(rng, split)
        return scene, caption(scene, rng), self.render(scene)


def _square_coverage(dx, dy, side):
    # Exact box-filter coverage of an axis-aligned square: product of the two 1-D overlaps.
    half = side / 2
    return np.clip(half + 0.5 - np.abs(dx), 0, 1) * np.clip(half + 0.5 - np.abs(dy), 0, 1)


def _circle_coverage(dx, dy, side):
    return np.clip(side / 2 + 0.5 - np.sqrt(dx * dx + dy * dy), 0, 1)


_SIN60 = math.sqrt(3) / 2


def _triangle_coverage(dx, dy, side):
    """Equilateral, pointing up, centred on its bounding box (width `side`, height side·√3/2).
    Coverage from the polygon's signed distance (max over the three edges' half-plane distances)."""
    half_h = side * _SIN60 / 2
    below = dy - half_h
    top = dy + half_h  # distance down from the apex
    left = -_SIN60 * dx - 0.5 * top
    right = _SIN60 * dx - 0.5 * top
    return np.clip(0.5 - np.maximum(np.maximum(left, right), below), 0, 1)


_COVERAGE = {"square": _square_coverage, "circle": _circle_coverage, "triangle": _triangle_coverage}


# ----------------------------------------------------------------------------------------------
# Caption grammar
# ----------------------------------------------------------------------------------------------

NOUNS = {"circle": ("circle", "disc", "ball"), "square": ("square", "box", "block"), "triangle": ("triangle",)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
BACKGROUND_WORDS = {"black": ("black",), "gray": ("gray", "grey"), "navy": ("navy",)}
MOTION_PHRASES = {
    "left": ("moving left", "sliding to the left", "drifting leftward", "travelling left", "moving to the left"),
    "right": ("moving right", "sliding to the right", "drifting rightward", "travelling right", "moving to the right"),
    "up": ("moving up", "sliding upward", "drifting upward", "travelling up", "rising"),
    "down": ("moving down", "sliding downward", "drifting downward", "travelling down", "falling"),
    "static": ("standing still", "resting", "motionless", "staying still"),
}
BACKGROUND_SUFFIXES = ("on a {} background", "against a {} backdrop", "over a {} background", "on {}", "in front of a {} wall")
BACKGROUND_PREFIXES = ("on a {} background,", "against a {} backdrop,")
#: {a} = first object's phrase, {b} = second's; True when {a} is the left object.
RELATIONS = (
    ("{a} to the left of {b}", True),
    ("{a} to the right of {b}", False),
    ("{a} left of {b}", True),
    ("{a} on the left and {b} on the right", True),
    ("{a} on the right and {b} on the left", False),
)
#: Probability that an optional attribute is stated in a caption.
STATE_PROBABILITY = {"colour": 0.85, "size": 0.5, "motion": 0.8, "background": 0.6}


def _with_article(rng, words: list[str], allow_one: bool) -> str:
    choices = ("a", "one", "") if allow_one else ("a", "a", "")
    article = _pick(rng, choices)
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return " ".join(([article] if article else []) + words)


def caption(scene: Scene, rng: np.random.Generator) -> Caption:
    """A caption of `scene` from the grammar, with the attributes it states. Optional attributes are
    left out at random, except both attributes of any held-out pair the scene contains."""
    required = [{a for pair in o.heldout_pairs() for a in pair} for o in scene.objects]

    def state(attr: str, i: int = 0) -> bool:
        return attr in required[i] or rng.random() < STATE_PROBABILITY[attr]

    specs, phrases = [], []
    for i, obj in enumerate(scene.objects):
        colour = obj.colour if state("colour", i) else None
        size = obj.size if state("size", i) else None
        motion = obj.motion if len(scene.objects) == 1 and state("motion", i) else None
        words = ([_pick(rng, SIZE_WORDS[size])] if size else []) + ([colour] if colour else []) + [_pick(rng, NOUNS[obj.shape])]
        phrase = _with_article(rng, words, allow_one=len(scene.objects) == 1)
        if motion:
            phrase += " " + _pick(rng, MOTION_PHRASES[motion])
        specs.append(ObjectSpec(obj.shape, colour, size, motion))
        phrases.append(phrase)
    if len(scene.objects) == 2:
        template, first_is_left = RELATIONS[int(rng.integers(len(RELATIONS)))]
        a, b = (0, 1) if first_is_left else (1, 0)
        text = template.format(a=phrases[a], b=phrases[b])
    else:
        text = phrases[0]
    background = scene.background if state("background") else None
    if background:
        word = _pick(rng, BACKGROUND_WORDS[background])
        if rng.random() < 0.25:
            text = f"{_pick(rng, BACKGROUND_PREFIXES).format(word)} {text}"
        else:
            text = f"{text} {_pick(rng, BACKGROUND_SUFFIXES).format(word)}"
    return Caption(text, PromptSpec(tuple(specs), background, ordered=len(scene.objects) == 2))


# ----------------------------------------------------------------------------------------------
# Prompt parsing
# ----------------------------------------------------------------------------------------------

_LEXICON: dict[str, tuple[str, str]] = {}
for _value, _words in NOUNS.items():
    _LEXICON.update({w: ("shape", _value) for w in _words})
_LEXICON.update({w + "s": ("shape", v) for w, (_, v) in list(_LEXICON.items())})
_LEXICON.update({"boxes": ("shape", "square"), "object": ("shape", ""), "shape": ("shape", ""), "thing": ("shape", "")})
_LEXICON.update({w: ("colour", w) for w in COLOURS})
for _value, _words in SIZE_WORDS.items():
    _LEXICON.update({w: ("size", _value) for w in _words})
_LEXICON.update({"big": ("size", "large"), "huge": ("size", "large")})
for _value, _words in BACKGROUND_WORDS.items():
    _LEXICON.update({w: ("background", _value) for w in _words})
for _direction in ("left", "right", "up", "down"):
    _LEXICON.update({_direction: ("motion", _direction), _direction + "ward": ("motion", _direction), _direction + "wards": ("motion", _direction)})
_LEXICON.update({w: ("motion", "up") for w in ("rising", "rises", "ascending", "climbing")})
_LEXICON.update({w: ("motion", "down") for w in ("falling", "falls", "sinking", "descending", "dropping")})
_LEXICON.update({w: ("motion", "static") for w in ("still", "resting", "rests", "motionless", "static", "stationary", "unmoving")})

_PAIR_SIDES = re.compile(r"\bon the (left|right) and (.*?) on the (left|right)\b")
_RELATION = re.compile(r"\b(?:to the |on the )?(left|right) (?:of|from)\b")
_POSITION = re.compile(r"\b(?:on|at|in) the (?:left|right|top|bottom)\b")


def parse_prompt(prompt: str) -> PromptSpec:
    """The attributes a prompt states, for any caption of the grammar and free text in its vocabulary.

    Colour and size words belong to the next noun, motion words to the previous one; black / gray /
    navy always name the background. 'X to the left of Y' (and the grammar's other relations) orders
    the objects left to right. An object noun without a known shape ('object', 'shape') has shape None.
    """
    text = " " + re.sub(r"[^a-z ]+", " ", prompt.lower()) + " "
    first_side = None
    match = _PAIR_SIDES.search(text)
    if match and match.group(1) != match.group(3):
        first_side = match.group(1)
        text = text[: match.start()] + " and " + match.group(2) + text[match.end() :]
    match = _RELATION.search(text)
    if first_side is None and match:
        first_side = match.group(1)
        text = text[: match.start()] + " and " + text[match.end() :]
    text = _POSITION.sub(" ", text)  # "a ball on the left": a place, not a motion; not judged

    objects: list[dict] = []
    pending: dict = {}
    background = None
    for word in text.split():
        attr, value = _LEXICON.get(word, (None, None))
        if attr == "background":
            background = value
        elif attr == "shape":
            objects.append({**pending, "shape": value or None})
            pending = {}
        elif attr in ("colour", "size"):
            pending[attr] = value
        elif attr == "motion":
            (objects[-1] if objects else pending)[attr] = value
    specs = tuple(ObjectSpec(**o) for o in objects)
    ordered = first_side is not None and len(specs) == 2
    if ordered and first_side == "right":
        specs = specs[::-1]
    return PromptSpec(specs, background, ordered)


# ----------------------------------------------------------------------------------------------
# Corpora and datasets
# ----------------------------------------------------------------------------------------------


def prompt_corpus(count: int, seed: int = 0, split: str | None = "train") -> list[str]:
    """`count` unique captions in a deterministic order (same seed → same list), e.g. for
    text-encoder distillation. Held-out pairs are excluded for split='train'."""
    split = _check_split(split)
    rng = np.random.default_rng(seed)
    seen: dict[str, None] = {}
    for _ in range(50 * count + 1000):
        if len(seen) == count:
            return list(seen)
        seen.setdefault(caption(sample_scene(rng, split), rng).text)
    raise UsageError(f"the caption grammar gave only {len(seen)} unique '{split}' prompts, fewer than {count}")


def video_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> float video [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


class ShapesVideoDataset(Dataset):
    """Map-style dataset of (video float [3, T, H, W] in [-1, 1], caption str).

    Item i is a pure function of (seed, i), so any sampler (shuffling, DistributedSampler, resuming
    mid-epoch) sees the same data for the same index.
    """

    def __init__(self, world: ShapesWorld | None = None, length: int = 100_000, seed: int = 0, split: str = "train"):
        self.world = world or ShapesWorld()
        self.length, self.seed, self.split = length, seed, _check_split(split)

    def __len__(self) -> int:
        return self.length

    def item(self, index: int) -> tuple[Scene, Caption, np.ndarray]:
        """The scene, caption and uint8 frames of item `index`."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, index))
        scene = self.world.sample_scene(rng, self.split)
        return scene, caption(scene, rng), self.world.render(scene)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        _, cap, frames = self.item(index)
        return video_tensor(frames), cap.text
