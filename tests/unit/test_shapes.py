"""The Shapes world: palette and geometry per the design, anti-aliased rendering, the caption grammar
and its parser, the held-out split, the prompt corpus, the dataset, and the caption tokenizer."""

import math
import time

import numpy as np
import pytest

from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.data import shapes as S
from neodragon_cli.pipelines.data.shapes import ObjectSpec, PromptSpec, Scene, ShapeObject, ShapesWorld


def test_palette_and_geometry_follow_the_design():
    assert S.BACKGROUNDS == {"black": (10, 10, 10), "gray": (110, 110, 110), "navy": (20, 25, 70)}
    assert S.COLOURS["red"] == (220, 40, 40) and S.COLOURS["orange"] == (245, 140, 30) and len(S.COLOURS) == 8
    assert S.SIZES == {"small": 0.20, "large": 0.36} and S.TRAVEL == 0.5
    with pytest.raises(UsageError):
        ShapesWorld(height=100)


@pytest.mark.parametrize("shape, expected_area", [
    ("square", lambda s: s * s),
    ("circle", lambda s: math.pi * s * s / 4),
    ("triangle", lambda s: math.sqrt(3) / 4 * s * s),
])
def test_rendered_coverage_matches_the_analytic_area(shape, expected_area):
    world = ShapesWorld(frames=5)
    scene = Scene("black", (ShapeObject(shape, "white", "large", "right", 0.3, 0.5),))
    frames = world.render(scene).astype(np.float64)
    bg, fg = np.array(S.BACKGROUNDS["black"]), np.array(S.COLOURS["white"])
    coverage = ((frames - bg) / (fg - bg)).mean(-1)  # per-pixel fraction of the object
    side = 0.36 * 128
    for t in range(5):
        assert coverage[t].sum() == pytest.approx(expected_area(side), rel=0.01)
    assert ((coverage > 0.05) & (coverage < 0.95)).any(), "edges must be anti-aliased"
    assert frames[0, 64, 0 if shape != "square" else 127].tolist() == list(bg)
    # The centre travels half the canvas to the right: compare coverage-weighted centroids.
    xs = np.arange(128) + 0.5
    cx = [(coverage[t].sum(0) * xs).sum() / coverage[t].sum() for t in (0, 4)]
    assert cx[1] - cx[0] == pytest.approx(0.5 * 128, abs=0.5)


def test_render_is_fast_and_objects_stay_inside():
    world, rng = ShapesWorld(), np.random.default_rng(0)
    scenes = [world.sample_scene(rng, "all") for _ in range(20)]
    start = time.perf_counter()
    videos = [world.render(s) for s in scenes]
    assert (time.perf_counter() - start) / len(scenes) < 0.1
    for scene, video in zip(scenes, videos):
        assert video.shape == (49, 128, 128, 3) and video.dtype == np.uint8
        bg = np.array(S.BACKGROUNDS[scene.background])
        if len(scene.objects) == 1:  # coverage never leaves the canvas: the object's area is constant
            fg = np.array(S.COLOURS[scene.objects[0].colour])
            channel = int(np.argmax(np.abs(fg - bg)))
            coverage = (video[..., channel].astype(float) - bg[channel]) / (fg[channel] - bg[channel])
            per_frame = coverage.sum((1, 2))
            assert per_frame.std() / per_frame.mean() < 0.01
    wide = ShapesWorld(height=128, width=192, frames=3)
    assert wide.render(wide.sample_scene(rng)).shape == (3, 128, 192, 3)


DESIGN_EXAMPLES = {
    "a small red circle moving left on a black background": PromptSpec((ObjectSpec("circle", "red", "small", "left"),), "black"),
    "red ball sliding to the left": PromptSpec((ObjectSpec("circle", "red", None, "left"),)),
    "a large cyan square resting against a gray backdrop": PromptSpec((ObjectSpec("square", "cyan", "large", "static"),), "gray"),
    "a yellow triangle to the left of a blue disc": PromptSpec((ObjectSpec("triangle", "yellow"), ObjectSpec("circle", "blue")), None, True),
    "a blue disc to the right of a yellow triangle": PromptSpec((ObjectSpec("triangle", "yellow"), ObjectSpec("circle", "blue")), None, True),
    "On a navy background, a big white box drifting upward.": PromptSpec((ObjectSpec("square", "white", "large", "up"),), "navy"),
    "a green block on the right and a tiny orange ball on the left over a grey background": PromptSpec(
        (ObjectSpec("circle", "orange", "small"), ObjectSpec("square", "green")), "gray", True
    ),
    "a red circle and a blue square": PromptSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue"))),
}


@pytest.mark.parametrize("prompt", list(DESIGN_EXAMPLES))
def test_parse_prompt_examples(prompt):
    assert S.parse_prompt(prompt) == DESIGN_EXAMPLES[prompt]


def test_captions_parse_back_to_their_stated_attributes():
    rng = np.random.default_rng(1)
    texts = set()
    for i in range(1500):
        scene = S.sample_scene(rng, ("train", "heldout", "all")[i % 3])
        cap = S.caption(scene, rng)
        assert S.parse_prompt(cap.text) == cap.spec, cap.text
        texts.add(cap.text)
        for stated, obj in zip(cap.spec.objects, scene.objects):  # stated attributes are true of the scene
            assert all(getattr(stated, a) in (None, getattr(obj, a)) for a in ("shape", "colour", "size", "motion"))
    assert len(texts) > 1400  # synonyms and optional parts make nearly every caption distinct


def test_heldout_pairs_never_in_train_and_always_stated_in_heldout():
    rng = np.random.default_rng(2)
    seen_pairs = set()
    for _ in range(3000):
        scene = S.sample_scene(rng, "train")
        for o in scene.objects:
            assert (o.colour, o.shape) not in S.HELDOUT_COLOUR_SHAPE and (o.colour, o.motion) not in S.HELDOUT_COLOUR_MOTION
    for _ in range(600):
        scene = S.sample_scene(rng, "heldout")
        assert scene.split == "heldout"
        cap = S.caption(scene, rng)
        for stated, obj in zip(cap.spec.objects, scene.objects):
            for pair in obj.heldout_pairs():
                assert all(getattr(stated, a) is not None for a in pair), cap.text
            if (obj.colour, obj.shape) in S.HELDOUT_COLOUR_SHAPE:
                seen_pairs.add((obj.colour, obj.shape))
            if (obj.colour, obj.motion) in S.HELDOUT_COLOUR_MOTION:
                seen_pairs.add((obj.colour, obj.motion))
    assert seen_pairs == set(S.HELDOUT_COLOUR_SHAPE | S.HELDOUT_COLOUR_MOTION)


def test_scene_for_prompt_shows_what_is_stated():
    world, rng = ShapesWorld(), np.random.default_rng(3)
    for prompt in DESIGN_EXAMPLES:
        spec = S.parse_prompt(prompt)
        for _ in range(5):
            scene = world.scene_for_prompt(prompt, rng)
            assert len(scene.objects) == len(spec.objects)
            assert spec.background in (None, scene.background)
            objects = scene.objects if spec.ordered else sorted(scene.objects, key=lambda o: (o.shape, o.colour))
            stated = spec.objects if spec.ordered else sorted(spec.objects, key=lambda o: (o.shape, o.colour))
            for s, o in zip(stated, objects):
                assert all(getattr(s, a) in (None, getattr(o, a)) for a in ("shape", "colour", "size", "motion"))
            if spec.ordered:
                assert scene.objects[0].x < scene.objects[1].x
    for bad in ("a sunset", "a red circle moving left next to a blue square moving up", "three circles, a box and a triangle and a ball"):
        with pytest.raises(UsageError):
            world.scene_for_prompt(bad, rng)


def test_prompt_corpus_is_unique_deterministic_and_train_only():
    corpus = S.prompt_corpus(5000, seed=7)
    assert len(set(corpus)) == 5000 and corpus == S.prompt_corpus(5000, seed=7)
    assert corpus != S.prompt_corpus(5000, seed=8)
    for text in corpus:
        for o in S.parse_prompt(text).objects:
            assert (o.colour, o.shape) not in S.HELDOUT_COLOUR_SHAPE and (o.colour, o.motion) not in S.HELDOUT_COLOUR_MOTION


@pytest.mark.slow
def test_prompt_corpus_reaches_100k():
    corpus = S.prompt_corpus(100_000)
    assert len(set(corpus)) == 100_000


def test_dataset_items_are_deterministic_videos_in_range():
    world = ShapesWorld(frames=9)
    data = S.ShapesVideoDataset(world, length=4, seed=5)
    video, text = data[2]
    assert tuple(video.shape) == (3, 9, 128, 128) and video.min() >= -1 and video.max() <= 1
    again, text_again = S.ShapesVideoDataset(world, length=4, seed=5)[2]
    assert text == text_again and bool((video == again).all())
    assert data[1][1] != text or not bool((data[1][0] == video).all())
    with pytest.raises(IndexError):
        data[4]


def test_caption_tokenizer_is_a_t5_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from neodragon_cli.pipelines.data.caption_tokenizer import load_caption_tokenizer, train_caption_tokenizer

    folder = train_caption_tokenizer(tmp_path / "tok", corpus_size=3000)
    tokenizer = load_caption_tokenizer(folder)
    assert tokenizer.model_max_length == 64
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    for text in S.prompt_corpus(200, seed=11, split="all") + ["A Red   BALL", "zebra 42"]:
        ids = tokenizer(text)["input_ids"]
        assert ids == sp.encode(text) + [1], text
    assert tokenizer.decode(tokenizer("A Red ball sliding to the left")["input_ids"], skip_special_tokens=True) == "a red ball sliding to the left"
    with pytest.raises(UsageError):
        train_caption_tokenizer(folder)  # not empty
