"""Video IO: mp4 determinism and fidelity, exact PNG/GIF round trips, streaming, atomicity, errors."""

import numpy as np
import pytest

from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.data.video_io import VideoWriter, read_video, to_uint8_frames, write_video


def _clip(frames=12, size=64):
    """A navy clip with a red square moving right (few colours, so GIF palettes are exact)."""
    video = np.empty((frames, size, size, 3), np.uint8)
    video[:] = (20, 25, 70)
    for t in range(frames):
        video[t, 20:36, 4 + 2 * t : 20 + 2 * t] = (220, 40, 40)
    return video


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_mp4_is_deterministic_and_close(tmp_path):
    video = _clip()
    write_video(tmp_path / "a.mp4", video, fps=24)
    write_video(tmp_path / "b.mp4", video, fps=24)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    decoded, fps = read_video(tmp_path / "a.mp4")
    assert decoded.shape == video.shape and decoded.dtype == np.uint8 and fps == 24
    assert np.abs(decoded.astype(int) - video).mean() < 3.0
    assert not _leftovers(tmp_path)


def test_streaming_writer_matches_one_shot(tmp_path):
    video = _clip()
    write_video(tmp_path / "whole.mp4", video)
    with VideoWriter(tmp_path / "stream.mp4") as writer:
        writer.append(video[:5])
        writer.append(video[5])  # a single [H, W, 3] frame
        writer.append(video[6:])
    assert writer.frame_count == len(video)
    assert (tmp_path / "whole.mp4").read_bytes() == (tmp_path / "stream.mp4").read_bytes()


@pytest.mark.parametrize("name", ["frames", "clip.gif"])
def test_png_folder_and_gif_round_trip_exactly(tmp_path, name):
    video = _clip(frames=6)
    write_video(tmp_path / name, video, fps=12.5)
    decoded, fps = read_video(tmp_path / name)
    np.testing.assert_array_equal(decoded, video)
    assert fps == pytest.approx(12.5)


def test_error_inside_writer_leaves_nothing(tmp_path):
    (tmp_path / "keep.mp4").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "keep.mp4") as writer:
            writer.append(_clip()[:3])
            raise RuntimeError("boom")
    assert (tmp_path / "keep.mp4").read_bytes() == b"old"
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "frames") as writer:
            writer.append(_clip()[:3])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


def test_png_folder_is_replaced_whole(tmp_path):
    write_video(tmp_path / "frames", _clip(frames=6))
    write_video(tmp_path / "frames", _clip(frames=3))
    assert read_video(tmp_path / "frames")[0].shape[0] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


@pytest.mark.parametrize(
    "frames, name",
    [
        (np.zeros((2, 16, 16, 3), np.float32), "a.mp4"),  # not uint8
        (np.zeros((2, 16, 16), np.uint8), "a.mp4"),  # no channels
        (np.zeros((2, 15, 16, 3), np.uint8), "a.mp4"),  # odd height for yuv420p
        (np.zeros((2, 16, 16, 3), np.uint8), "a.webp"),  # unknown format
    ],
)
def test_bad_inputs_are_usage_errors(tmp_path, frames, name):
    with pytest.raises(UsageError):
        write_video(tmp_path / name, frames)
    assert not list(tmp_path.iterdir())


def test_read_errors(tmp_path):
    with pytest.raises(UsageError):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UsageError):
        read_video(tmp_path / "x.txt")


def test_to_uint8_frames_inverts_the_dataset_scaling():
    torch = pytest.importorskip("torch")
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    np.testing.assert_array_equal(to_uint8_frames(video), frames)
