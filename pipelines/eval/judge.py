"""The Shapes-world judge: what a video shows, read from its pixels alone, scored against a prompt.

Input: uint8 frames [T, H, W, 3] of any size (generated videos need not be 128x128) and a prompt.

Detection (`detect`):
- background: per-channel median of the clip → nearest background colour of the palette;
- objects: pixels whose largest channel difference from the background exceeds `FOREGROUND_DIFF`,
  grouped into connected components per frame (components smaller than `MIN_AREA` of the canvas are
  noise); the object count is the most common count over frames, and objects are tracked left to
  right in the frames that show that count;
- per object, with a soft coverage alpha = projection of (pixel − background) onto (core colour −
  background): colour = nearest palette colour of the core (fully covered) pixels; width and height
  = sums over columns / rows of the maximum alpha; shape from the fill ratio area/(width·height)
  (square ≈ 1, circle ≈ π/4, triangle ≈ ½); size from max(width, height)/short side (small 0.20,
  large 0.36); motion from the alpha-weighted centroid's displacement over the clip (static below
  `STATIC_TRAVEL`, else the dominant axis).

Semantic score (`score`): every attribute the prompt states is right or wrong — count, background,
left/right relation, and each stated object's shape, colour, size, motion. Stated objects are matched
to detected ones by the assignment agreeing on the most attributes. Semantic = mean over the judged
attributes.

Quality proxies, each in [0, 1]:
- flicker: VBench temporal_flickering normalised with VBench's Min/Max;
- background_stability: 1 − mean |pixel − clip background| / 32 over pixels away from objects;
- area_stability: per object 1 − std/mean of its area over frames, times the fraction of frames
  showing the clip's object count (objects that pop in and out lose);
- sharpness: `SHARP_EDGE_WIDTH` / measured edge width (pixels with 0.1 < alpha < 0.9 per unit of
  edge length, median over frames), capped at 1: 1 for rendered and mp4-encoded ground truth, about
  0.77 after a 1-px Gaussian blur, 0.38 after a 2-px one.
Quality = their mean; Total = (4·Quality + Semantic)/5, VBench's weighting.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from neodragon_cli.pipelines.data.shapes import BACKGROUNDS, COLOURS, SIZES, PromptSpec, parse_prompt
from neodragon_cli.pipelines.eval.metrics import temporal_flicker, vbench_normalise

FOREGROUND_DIFF = 40  # a pixel is foreground when some channel differs this much from the background
MIN_AREA = 0.004  # components smaller than this fraction of the canvas are noise (a small triangle is ~0.02)
MEASURED_FRAMES = 16  # per object, at most about this many frames (evenly spread) are measured
STATIC_TRAVEL = 0.15  # centroid travel (canvas fraction) below which an object counts as static
FILL_SQUARE, FILL_TRIANGLE = 0.89, 0.64  # fill ratio above → square; below → triangle; between → circle
SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2
# Edge width (px) that still counts as perfectly sharp: a box-filtered edge measures ~1 px, but mp4's
# yuv420p keeps colour at half resolution, so edges whose contrast is mostly chroma measure ~2 px.
SHARP_EDGE_WIDTH = 2.0
QUALITY_PROXIES = ("flicker", "background_stability", "area_stability", "sharpness")
ATTRIBUTES = ("count", "background", "relation", "shape", "colour", "size", "motion")

_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], np.float32)
_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array([COLOURS[n] for n in _COLOUR_NAMES], np.float32)


@dataclass
class DetectedObject:
    shape: str
    colour: str
    size: str
    motion: str
    x: float  # mean centroid, fraction of the width
    y: float
    fill: float
    extent: float  # max(width, height) / short side
    travel: tuple[float, float]  # centroid displacement over the clip (x, y), canvas fractions


@dataclass
class Detection:
    background: str
    objects: list[DetectedObject]  # left to right
    proxies: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects], "proxies": self.proxies}


@dataclass
class JudgeResult:
    semantic: float
    quality: float
    total: float
    attributes: dict[str, bool]  # judged attribute name ('count', 'object0.colour', ...) → correct
    proxies: dict[str, float]
    detection: Detection

    def to_dict(self) -> dict:
        return {
            "semantic": self.semantic,
            "quality": self.quality,
            "total": self.total,
            "attributes": self.attributes,
            "proxies": self.proxies,
            "detection": self.detection.to_dict(),
        }


def attribute_kind(name: str) -> str:
    """'object1.colour' → 'colour'; 'count' → 'count'."""
    return name.rsplit(".", 1)[-1]


def _nearest(rgb: np.ndarray, names: list[str], table: np.ndarray) -> str:
    return names[int(np.argmin(((table - rgb) ** 2).sum(1)))]


def _label_frames(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of each frame of a [T, H, W] mask, labels unique across frames."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 2)  # 8-connected within a frame, never across time
    return ndimage.label(mask, structure=structure)


def detect(frames: np.ndarray) -> Detection:
    """Read background, objects and quality proxies from uint8 frames [T, H, W, 3]."""
    frames = np.asarray(frames)
    T, H, W, _ = frames.shape
    short = min(H, W)
    bg_rgb = np.median(frames[::2, ::4, ::4].reshape(-1, 3), axis=0).astype(np.float32)
    # Largest per-channel |pixel − background|, through one 256-entry lookup table per channel.
    levels = np.arange(256, dtype=np.int16)
    luts = [np.abs(levels - int(round(float(c)))).astype(np.uint8) for c in bg_rgb]
    diff = np.maximum(np.maximum(luts[0][frames[..., 0]], luts[1][frames[..., 1]]), luts[2][frames[..., 2]])
    foreground = diff > FOREGROUND_DIFF
    labels, n_labels = _label_frames(foreground)
    boxes = ndimage.find_objects(labels)  # boxes[k - 1] = (frame slice, row slice, column slice) of label k

    areas = np.bincount(labels.ravel(), minlength=n_labels + 1)
    per_frame: list[list[int]] = [[] for _ in range(T)]
    for k in range(1, n_labels + 1):
        if areas[k] >= MIN_AREA * H * W:
            per_frame[boxes[k - 1][0].start].append(k)
    counts = np.array([len(p) for p in per_frame])
    count = int(np.bincount(counts).argmax())
    tracked = [t for t in range(T) if counts[t] == count]
    # Shape, colour and size need few frames; motion and area need them spread over the clip.
    measured = tracked[:: max(1, len(tracked) // MEASURED_FRAMES)]

    def left_to_right(k: int) -> int:  # twice the box's centre column
        return boxes[k - 1][2].start + boxes[k - 1][2].stop

    objects, area_scores, edge_widths = [], [], []
    for i in range(count):
        comps = [(t, sorted(per_frame[t], key=left_to_right)[i]) for t in measured]
        obj, area_score, widths = _measure(frames, labels, boxes, bg_rgb, comps, short)
        objects.append(obj)
        area_scores.append(area_score)
        edge_widths += widths
    objects.sort(key=lambda o: o.x)

    # Background pixels: not foreground and at least 2 px away from any component.
    away = ~ndimage.maximum_filter(foreground, size=(1, 5, 5))
    residual = diff[away].mean() if away.any() else 255.0
    proxies = {
        "flicker": vbench_normalise(temporal_flicker(frames)),
        "background_stability": float(np.clip(1.0 - residual / 32.0, 0.0, 1.0)),
        "area_stability": float(np.mean(area_scores)) * len(tracked) / T if count else 0.0,
        "sharpness": float(min(1.0, SHARP_EDGE_WIDTH / np.median(edge_widths))) if edge_widths else 0.0,
    }
    return Detection(_nearest(bg_rgb, _BG_NAMES, _BG_RGB), objects, proxies)


def _measure(frames, labels, boxes, bg_rgb, comps: list[tuple[int, int]], short: int):
    """Attributes of one tracked object from its component (label k, bounding slices boxes[k-1]) in
    each tracked frame t."""
    T, H, W, _ = frames.shape
    core_pixels, areas, fills, extents, centroids, widths = [], [], [], [], [], []
    for t, k in comps:
        _, rows, cols = boxes[k - 1]
        y0, y1, x0, x1 = max(rows.start - 2, 0), min(rows.stop + 2, H), max(cols.start - 2, 0), min(cols.stop + 2, W)
        patch = frames[t, y0:y1, x0:x1].astype(np.float32) - bg_rgb
        own = labels[t, y0:y1, x0:x1]
        strength = np.abs(patch).max(-1)
        inside = own == k
        core = patch[inside & (strength >= 0.8 * strength[inside].max())]
        core_pixels.append(core)
        tone = np.median(core, axis=0)
        # Soft coverage: 1 on the object's colour, 0 on the background, fractions on anti-aliased edges.
        alpha = np.clip(patch @ tone / max(float(tone @ tone), 1.0), 0.0, 1.0)
        alpha[(own != k) & (own != 0)] = 0.0  # another object's pixels
        width, height = alpha.max(0).sum(), alpha.max(1).sum()
        area = alpha.sum()
        areas.append(area)
        fills.append(area / max(width * height, 1e-6))
        extents.append(max(width, height) / short)
        gy, gx = np.gradient(alpha)
        edge_length = np.sqrt(gx * gx + gy * gy).sum()
        widths.append(((alpha > 0.1) & (alpha < 0.9)).sum() / max(edge_length, 1e-6))
        py, px = np.mgrid[y0:y1, x0:x1]
        centroids.append(((alpha * px).sum() / max(area, 1e-6) + 0.5, (alpha * py).sum() / max(area, 1e-6) + 0.5))

    colour = _nearest(np.median(np.concatenate(core_pixels), axis=0) + bg_rgb, _COLOUR_NAMES, _COLOUR_RGB)
    fill = float(np.median(fills))
    shape = "square" if fill > FILL_SQUARE else "triangle" if fill < FILL_TRIANGLE else "circle"
    extent = float(np.median(extents))
    size = "small" if extent < SIZE_SPLIT else "large"

    times = np.array([t for t, _ in comps], np.float64)
    path = np.array(centroids) / np.array([W, H])
    if len(times) >= 2 and times[-1] > times[0]:
        slope = np.polyfit(times, path, 1)[0]  # [dx/dt, dy/dt] in canvas fractions per frame
        travel = slope * (T - 1)
    else:
        travel = np.zeros(2)
    if np.abs(travel).max() < STATIC_TRAVEL:
        motion = "static"
    elif abs(travel[0]) >= abs(travel[1]):
        motion = "right" if travel[0] > 0 else "left"
    else:
        motion = "down" if travel[1] > 0 else "up"

    areas = np.array(areas)
    area_score = float(np.clip(1.0 - areas.std() / max(areas.mean(), 1e-6), 0.0, 1.0))
    obj = DetectedObject(
        shape, colour, size, motion, float(path[:, 0].mean()), float(path[:, 1].mean()), fill, extent, (float(travel[0]), float(travel[1]))
    )
    return obj, area_score, widths


def score(spec: PromptSpec, detection: Detection) -> dict[str, bool]:
    """Right/wrong for every attribute the prompt states (names as `PromptSpec.judged()`)."""
    found = detection.objects[:6]  # more than 6 detections is hopeless anyway; keeps the search small
    n = len(spec.objects)
    results: dict[str, bool] = {"count": len(detection.objects) == n}
    if spec.background is not None:
        results["background"] = detection.background == spec.background

    def agreement(assignment) -> tuple[int, bool]:
        hits = sum(
            getattr(spec.objects[i], a) == getattr(found[j], a)
            for i, j in enumerate(assignment)
            if j is not None
            for a in ("shape", "colour", "size", "motion")
            if getattr(spec.objects[i], a) is not None
        )
        return hits, _relation_holds(spec, found, assignment)

    # Stated objects → distinct detected objects (or None when there are too few detections).
    candidates = set(itertools.permutations(list(range(len(found))) + [None] * n, n))
    best = max(sorted(candidates, key=lambda a: tuple(-1 if j is None else j for j in a)), key=agreement)
    if spec.ordered:
        results["relation"] = _relation_holds(spec, found, best)
    for i, (stated, j) in enumerate(zip(spec.objects, best)):
        for a in ("shape", "colour", "size", "motion"):
            if getattr(stated, a) is not None:
                results[f"object{i}.{a}"] = j is not None and getattr(found[j], a) == getattr(stated, a)
    return {name: results[name] for name in spec.judged()}


def _relation_holds(spec: PromptSpec, found: list[DetectedObject], assignment) -> bool:
    """The stated left object is detected left of the stated right one (objects are listed left to right)."""
    if not spec.ordered or None in assignment[:2]:
        return False
    return found[assignment[0]].x < found[assignment[1]].x


def judge(frames: np.ndarray, prompt: str | PromptSpec) -> JudgeResult:
    """Semantic, Quality and Total of a video for a prompt (see the module docstring)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    detection = detect(frames)
    attributes = score(spec, detection)
    semantic = float(np.mean(list(attributes.values())))
    quality = float(np.mean([detection.proxies[p] for p in QUALITY_PROXIES]))
    return JudgeResult(semantic, quality, (4 * quality + semantic) / 5, attributes, dict(detection.proxies), detection)
