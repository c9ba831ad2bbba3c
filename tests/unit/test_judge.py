"""The Shapes judge and the video metrics.

Ground truth: rendered scenes must be judged right (>= 99% per attribute, also after an mp4 round
trip); prompts contradicting the scene must be judged wrong on exactly the contradicted attribute;
degraded videos must lose on the matching quality proxy. Metrics are checked against formulas
computed independently in the test.
"""

import collections
import dataclasses
import math

import numpy as np
import pytest
from scipy import ndimage

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.data import shapes as S
from neodragon_cli.pipelines.data.video_io import read_video, write_video
from neodragon_cli.pipelines.eval import metrics as M
from neodragon_cli.pipelines.eval.judge import attribute_kind, judge

WORLD = S.ShapesWorld()


def _samples(count, seed, frames=49):
    """Scenes alternating between the two splits, with captions and rendered frames."""
    world = S.ShapesWorld(frames=frames)
    rng = np.random.default_rng(seed)
    for i in range(count):
        scene = S.sample_scene(rng, "heldout" if i % 2 else "train")
        yield scene, S.caption(scene, rng), world.render(scene)


def _accuracy(results):
    per_kind = collections.defaultdict(list)
    for attributes in results:
        for name, ok in attributes.items():
            per_kind[attribute_kind(name)].append(ok)
    return {kind: float(np.mean(v)) for kind, v in per_kind.items()}


# 17-frame clips keep the default run fast; the full 49-frame clips run with the slow tests.
@pytest.mark.parametrize("clip_frames", [17, pytest.param(49, marks=pytest.mark.slow)])
def test_judge_reads_rendered_ground_truth(clip_frames):
    results, semantics = [], []
    for _, cap, frames in _samples(220, seed=10 + clip_frames, frames=clip_frames):
        result = judge(frames, cap.text)
        results.append(result.attributes)
        semantics.append(result.semantic)
        assert set(result.attributes) == set(cap.spec.judged())
        assert result.quality > 0.95 and result.total == pytest.approx((4 * result.quality + result.semantic) / 5)
    accuracy = _accuracy(results)
    assert set(accuracy) == {"count", "background", "relation", "shape", "colour", "size", "motion"}
    assert min(accuracy.values()) >= 0.99, accuracy
    assert np.mean(semantics) >= 0.99


def test_judge_survives_mp4(tmp_path):
    results = []
    for i, (_, cap, frames) in enumerate(_samples(30, seed=11, frames=25)):
        write_video(tmp_path / f"{i}.mp4", frames)
        decoded, _ = read_video(tmp_path / f"{i}.mp4")
        result = judge(decoded, cap.text)
        results.append(result.attributes)
        assert result.quality > 0.9
    assert min(_accuracy(results).values()) >= 0.99


def _contradict(spec, rng):
    """Change one stated attribute of `spec` to another value; returns (new spec, judged name)."""
    options = {"background": list(S.BACKGROUNDS), "shape": list(S.SHAPES), "colour": list(S.COLOURS), "size": list(S.SIZES), "motion": list(S.MOTIONS)}
    name = spec.judged()[int(rng.integers(1, len(spec.judged())))] if len(spec.judged()) > 1 else "count"
    if name == "count":
        return S.PromptSpec(spec.objects * 2, spec.background, False), name
    if name == "background":
        return dataclasses.replace(spec, background=next(b for b in options["background"] if b != spec.background)), name
    if name == "relation":
        return dataclasses.replace(spec, objects=spec.objects[::-1]), name
    index, attr = int(name[6]), name.split(".")[1]
    old = getattr(spec.objects[index], attr)
    new = options[attr][(options[attr].index(old) + 1 + int(rng.integers(len(options[attr]) - 1))) % len(options[attr])]
    objects = list(spec.objects)
    objects[index] = dataclasses.replace(objects[index], **{attr: new})
    return dataclasses.replace(spec, objects=tuple(objects)), name


def test_contradicted_attributes_are_judged_wrong():
    rng = np.random.default_rng(12)
    for scene, cap, frames in _samples(60, seed=12, frames=17):
        spec, name = _contradict(cap.spec, rng)
        if name == "relation" and spec.objects[0] == spec.objects[1]:
            continue  # swapping two identical descriptions contradicts nothing
        attributes = judge(frames, spec).attributes
        assert not attributes[name], (cap.text, name, attributes)
        if name != "relation":  # a swapped pair may also mismatch per-object attributes
            assert sum(not ok for ok in attributes.values()) == 1, (cap.text, name, attributes)


def _one_object_clip():
    scene = S.Scene("gray", (S.ShapeObject("circle", "yellow", "large", "right", 0.3, 0.5),))
    return scene, "a large yellow circle moving right on a gray background", WORLD.render(scene)


def test_quality_proxies_drop_on_degraded_videos():
    _, prompt, frames = _one_object_clip()
    clean = judge(frames, prompt).proxies
    assert min(clean.values()) > 0.97
    blurred = np.round(ndimage.gaussian_filter(frames.astype(float), (0, 1.5, 1.5, 0))).astype(np.uint8)
    assert judge(blurred, prompt).proxies["sharpness"] < 0.7
    noisy = np.clip(frames + np.random.default_rng(0).normal(0, 12, frames.shape), 0, 255).astype(np.uint8)
    assert judge(noisy, prompt).proxies["background_stability"] < 0.85
    flicker = frames.astype(int)
    flicker[1::2] += 40
    flicker = np.clip(flicker, 0, 255).astype(np.uint8)
    assert judge(flicker, prompt).proxies["flicker"] < 0.7
    popping = frames.copy()
    popping[::3] = S.BACKGROUNDS["gray"]  # the object vanishes in a third of the frames
    assert judge(popping, prompt).proxies["area_stability"] < 0.75
    shrinking = frames.copy()
    for t in range(0, 49, 2):
        shrinking[t] = WORLD.render(S.Scene("gray", (S.ShapeObject("circle", "yellow", "small", "right", 0.3, 0.5),)))[t]
    assert judge(shrinking, prompt).proxies["area_stability"] < 0.75


def test_empty_video_scores_zero_on_objects():
    frames = np.full((9, 128, 128, 3), S.BACKGROUNDS["navy"], np.uint8)
    result = judge(frames, "a red square on a navy background")
    assert result.attributes == {"count": False, "background": True, "object0.shape": False, "object0.colour": False}
    assert result.proxies["area_stability"] == 0 and result.proxies["sharpness"] == 0


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_temporal_flicker_is_the_vbench_formula():
    levels = [10, 30, 25, 25, 60]
    frames = np.stack([np.full((8, 8, 3), v, np.uint8) for v in levels])
    expected = (255 - np.mean(np.abs(np.diff(levels)))) / 255
    assert M.temporal_flicker(frames) == pytest.approx(expected)
    assert M.vbench_normalise(expected) == pytest.approx((expected - 0.6293) / (1 - 0.6293))
    assert M.vbench_normalise(0.5) == 0.0


def test_psnr():
    a = np.random.default_rng(0).integers(20, 200, (3, 16, 16, 3), dtype=np.uint8)
    assert M.psnr(a, a + np.uint8(5)) == pytest.approx(20 * math.log10(255 / 5))
    assert M.psnr(a, a) == math.inf
    with pytest.raises(UsageError):
        M.psnr(a, a[:2])


def _ssim_naive(x, y):
    """Direct windowed SSIM of one grey image (float64 loops over every valid 11x11 window)."""
    t = np.arange(11) - 5
    g = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    expected = np.mean([_ssim_naive(a[t, :, :, c].astype(float), b[t, :, :, c].astype(float)) for t in range(2) for c in range(3)])
    assert M.ssim(a, b) == pytest.approx(expected, abs=1e-4)
    assert M.ssim(a, a) == pytest.approx(1.0)


def test_lpips_needs_local_weights(tmp_path):
    torch = pytest.importorskip("torch")
    video = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(UsageError, match="weights"):
        M.lpips(video, video, backbone=None)
    with pytest.raises(UsageError):
        M.lpips(video, video, backbone=tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="features.0.weight"):
        M.lpips(video, video, backbone=tmp_path / "wrong.pth")
    # A random AlexNet in torchvision's key layout, plus LPIPS-style linear heads.
    torch.manual_seed(0)
    state = {}
    for index, cin, cout, k, _, _ in M._ALEX_CONVS:
        state[f"features.{index}.weight"] = torch.randn(cout, cin, k, k) * (2 / (cin * k * k)) ** 0.5
        state[f"features.{index}.bias"] = torch.zeros(cout)
    torch.save(state, tmp_path / "alexnet.pth")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c[2], 1, 1) for k, c in enumerate(M._ALEX_CONVS)}
    torch.save(heads, tmp_path / "alex.pth")
    other = np.clip(video.astype(int) + 60, 0, 255).astype(np.uint8)
    for head_file in (None, tmp_path / "alex.pth"):
        assert M.lpips(video, video, tmp_path / "alexnet.pth", head_file) == pytest.approx(0.0, abs=1e-6)
        assert M.lpips(video, other, tmp_path / "alexnet.pth", head_file) > 0
