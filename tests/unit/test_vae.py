"""Causal VAEs, TAEHV and latent normalisation on tiny random models: real-size parameter counts
(meta device), save/load round trips with auto-detection, mismatching checkpoints, causality,
chunked == full, streaming == parallel, frame counts, the training path and the normalisation maps."""

from __future__ import annotations

import json
import math

import pytest
import torch

import neodragon_cli
from neodragon_cli.errors import CheckpointError, UnknownNameError, UsageError
from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE, CausalVideoVAE
from neodragon_cli.pipelines.models.checkpoint import count_parameters
from neodragon_cli.pipelines.models.latents import SCHEMES, LatentNorm, Whitening, denormalize, normalize
from neodragon_cli.pipelines.models.taehv import TAEHV, TAEHVDecoder

ENCODER = dict(
    encoder_block_out_channels=(8, 8, 16, 16), encoder_layers_per_block=(1, 1, 1, 1), encoder_norm_num_groups=4,
)  # fmt: skip
TINY_PF = dict(
    ENCODER, decoder_block_out_channels=(8, 8, 16, 16), decoder_layers_per_block=(1, 1, 1, 1), decoder_norm_num_groups=4
)
TINY_ASYM = dict(ENCODER, decoder_num_features=(16, 12, 8, 8))


def _seeded(factory, seed=0):
    torch.manual_seed(seed)
    model = factory().eval()
    with torch.no_grad():  # default init shrinks signals layer by layer: use std 1/sqrt(fan_in), jitter norms/biases
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(math.sqrt(3))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


def _video(t=17, size=16, seed=1):
    return torch.rand(1, 3, t, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(t=3, size=2, seed=2):
    return torch.randn(1, 16, t, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- real-size architectures


def test_real_size_parameter_counts_on_meta_device():
    with torch.device("meta"):
        pf, asym, tae = CausalVideoVAE(), AsymmetricCausalVideoVAE(), TAEHV()
        neo_decoder = TAEHVDecoder()
    # counts from the reference notes (computed from the published architectures)
    assert count_parameters(pf.decoder) == 225_768_707
    assert count_parameters(pf.encoder) == 109_632_032
    assert count_parameters(pf) == 335_402_067
    assert count_parameters(neo_decoder) == 9_910_147
    assert count_parameters(asym) == 119_543_507
    assert (count_parameters(tae.encoder), count_parameters(tae.decoder)) == (1_470_928, 9_844_611)


# ---------------------------------------------------------------------- save / load / detect


@pytest.mark.parametrize(
    "factory, saved_kind",
    [
        (lambda: CausalVideoVAE(**TINY_PF), CausalVideoVAE),
        (lambda: AsymmetricCausalVideoVAE(**TINY_ASYM), AsymmetricCausalVideoVAE),
        (lambda: TAEHV(), TAEHV),
    ],
    ids=["pyramid-flow", "neodragon-asymmetric", "taehv"],
)
def test_save_load_roundtrip_autodetects(tmp_path, factory, saved_kind):
    model = _seeded(factory)
    model.save_pretrained(tmp_path / "vae")
    loaded = neodragon_cli.load_component("vae", tmp_path / "vae")
    assert type(loaded) is saved_kind and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    latents = torch.randn(1, 16, 2, 2, 2)
    with torch.no_grad():
        assert torch.equal(loaded.decode(latents), model.decode(latents))


def test_model_root_with_causal_video_vae_subfolder_loads(tmp_path):
    model = _seeded(lambda: CausalVideoVAE(**TINY_PF))
    model.save_pretrained(tmp_path / "root" / "causal_video_vae")
    assert isinstance(neodragon_cli.load_component("vae", tmp_path / "root"), CausalVideoVAE)


def test_taehv_pth_file_config_inferred_from_shapes(tmp_path):
    model = _seeded(lambda: TAEHV(latent_channels=12, patch_size=2, decoder_time_upscale=(True, True, False)))
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "taew_custom.pth")
    loaded = neodragon_cli.load_component("vae", tmp_path / "taew_custom.pth")
    assert loaded.config == model.config
    assert torch.equal(loaded.decoder[22].weight, model.decoder[22].weight.half().float())


def test_mismatching_checkpoint_names_keys(tmp_path):
    _seeded(lambda: CausalVideoVAE(**TINY_PF)).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["decoder_layers_per_block"] = [2, 1, 1, 1]  # one more resnet in up block 0 than the weights hold
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.up_blocks\.0\.resnets\.1\."):
        neodragon_cli.load_component("vae", tmp_path / "vae")


def test_wrong_decoder_widths_name_shapes(tmp_path):
    _seeded(lambda: AsymmetricCausalVideoVAE(**TINY_ASYM)).save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match=r"wrong shapes: decoder\.blocks\.1\.weight"):
        AsymmetricCausalVideoVAE.from_pretrained(tmp_path / "vae", decoder_num_features=[24, 12, 8, 8])


def test_taehv_file_with_missing_key_fails(tmp_path):
    state = TAEHV().state_dict()
    state.pop("decoder.13.conv.weight")
    torch.save(state, tmp_path / "taehv.pth")
    with pytest.raises(CheckpointError, match="decoder.13.conv.weight"):
        neodragon_cli.load_component("vae", tmp_path / "taehv.pth")


def test_legacy_attention_key_names_load(tmp_path):
    model = _seeded(lambda: CausalVideoVAE(**TINY_PF))
    model.save_pretrained(tmp_path / "vae")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in load_file(str(path)).items():
        for new, legacy in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(path))
    loaded = CausalVideoVAE.from_pretrained(tmp_path / "vae")
    attention = lambda m: m.encoder.mid_block.attentions[0]  # noqa: E731
    assert torch.equal(attention(loaded).to_out[0].weight, attention(model).to_out[0].weight)
    assert torch.equal(attention(loaded).to_q.bias, attention(model).to_q.bias)


# ---------------------------------------------------------------------- Pyramid-Flow VAE behaviour


@pytest.fixture(scope="module")
def pf():
    return _seeded(lambda: CausalVideoVAE(**TINY_PF))


def test_pf_frame_counts_and_image_path(pf):
    with torch.no_grad():
        assert pf.encode(_video(17)).mean.shape == (1, 16, 3, 2, 2)
        assert pf.encode(_video(1)).mean.shape == (1, 16, 1, 2, 2)
        assert pf.decode(_latents(3)).shape == (1, 3, 17, 16, 16)
        assert pf.decode(_latents(1)).shape == (1, 3, 1, 16, 16)


def test_pf_is_causal_in_time(pf):
    video, latents = _video(17), _latents(3)
    video2, latents2 = video.clone(), latents.clone()
    video2[:, :, 9:] = 0.0  # change frames 9.. -> latents 0 and 1 (frames 0..8) must not move
    latents2[:, :, 2] += 1.0  # change latent 2 -> frames 0..8 must not move
    with torch.no_grad():
        a, b = pf.encode(video).mean, pf.encode(video2).mean
        assert torch.allclose(a[:, :, :2], b[:, :, :2], atol=1e-6) and not torch.allclose(a[:, :, 2], b[:, :, 2])
        x, y = pf.decode(latents), pf.decode(latents2)
        assert torch.allclose(x[:, :, :9], y[:, :, :9], atol=1e-6) and not torch.allclose(x[:, :, 9:], y[:, :, 9:])


@pytest.mark.parametrize("window", [1, 2, 3])
def test_pf_chunked_decode_equals_full(pf, window):
    latents = _latents(5)
    with torch.no_grad():
        torch.testing.assert_close(pf.decode(latents, window=window), pf.decode(latents), atol=1e-5, rtol=1e-5)


def test_pf_stream_decode_frame_by_frame(pf):
    latents = _latents(4)
    with torch.no_grad():
        chunks = list(pf.stream_decode(latents.split(1, dim=2)))
        assert [c.shape[2] for c in chunks] == [1, 8, 8, 8]
        torch.testing.assert_close(torch.cat(chunks, dim=2), pf.decode(latents), atol=1e-5, rtol=1e-5)


def test_pf_chunked_encode_equals_full(pf):
    video = _video(25)
    with torch.no_grad():
        full, chunked = pf.encode(video), pf.encode(video, window=8)
    torch.testing.assert_close(chunked.moments, full.moments, atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError, match="divisible by 8"):
        pf.encode(video, window=4)


def test_pf_training_path_kl_and_gradients():
    model = _seeded(lambda: CausalVideoVAE(**TINY_PF)).train()
    video = _video(9)
    recon, posterior = model(video, generator=torch.Generator().manual_seed(0))
    assert recon.shape == video.shape
    expected_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(posterior.mean, posterior.std), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2, 3, 4))
    torch.testing.assert_close(posterior.kl(), expected_kl, atol=1e-4, rtol=1e-4)
    loss = (recon - video).pow(2).mean() + 1e-6 * posterior.kl().mean()
    loss.backward()
    assert model.encoder.conv_in.conv.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.conv.weight.grad.abs().sum() > 0
    # same generator seed -> same sample; the mode is the mean
    again = posterior.sample(torch.Generator().manual_seed(0))
    assert torch.equal(again, posterior.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(posterior.mode(), posterior.mean)


def test_logvar_is_clamped():
    from neodragon_cli.pipelines.models.causal_vae import DiagonalGaussian

    moments = torch.cat([torch.zeros(1, 2, 1, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1, 1)], dim=1)
    assert DiagonalGaussian(moments).logvar.flatten().tolist() == [-30.0, 20.0]


# ---------------------------------------------------------------------- TAEHV / TAEHV-style decoders


@pytest.fixture(scope="module")
def taehv():
    return _seeded(lambda: TAEHV(), seed=3)


def test_taehv_streaming_equals_parallel(taehv):
    video = _video(9)
    with torch.no_grad():
        latents = taehv.encode(video)
        assert latents.shape == (1, 16, 3, 2, 2)
        streamed = torch.cat(list(taehv.stream_encode(video.split(2, dim=2))), dim=2)
        torch.testing.assert_close(streamed, latents, atol=1e-5, rtol=1e-5)
        frames = taehv.decode(latents)
        assert frames.shape == (1, 3, 9, 16, 16) and frames.abs().max() <= 1
        torch.testing.assert_close(taehv.decode(latents, parallel=False), frames, atol=1e-5, rtol=1e-5)
        streamed = torch.cat(list(taehv.stream_decode([latents[:, :, :2], latents[:, :, 2:]])), dim=2)
        torch.testing.assert_close(streamed, frames, atol=1e-5, rtol=1e-5)


def test_taehv_pads_time_by_repeating_the_last_frame(taehv):
    video = _video(6)
    padded = torch.cat([video, video[:, :, -1:], video[:, :, -1:]], dim=2)
    with torch.no_grad():
        assert torch.equal(taehv.encode(video), taehv.encode(padded))


def test_taehv_decoder_is_causal(taehv):
    latents = _latents(3)
    later = latents.clone()
    later[:, :, 2] += 1.0
    with torch.no_grad():
        a, b = taehv.decode(latents), taehv.decode(later)
    assert torch.allclose(a[:, :, :5], b[:, :, :5], atol=1e-6) and not torch.allclose(a[:, :, 5:], b[:, :, 5:])


def test_asymmetric_vae_streaming_equals_parallel_and_counts():
    vae = _seeded(lambda: AsymmetricCausalVideoVAE(**TINY_ASYM), seed=4)
    latents = _latents(4)
    with torch.no_grad():
        frames = vae.decode(latents)
        assert frames.shape == (1, 3, 25, 16, 16)
        chunks = list(vae.stream_decode(latents.split(1, dim=2)))
        assert [c.shape[2] for c in chunks] == [1, 8, 8, 8]
        torch.testing.assert_close(torch.cat(chunks, dim=2), frames, atol=1e-5, rtol=1e-5)
        assert vae.encode(_video(17)).mean.shape == (1, 16, 3, 2, 2)
    recon, posterior = vae(_video(9))  # training path works for the asymmetric model too
    assert recon.shape == (1, 3, 9, 16, 16) and posterior.kl().shape == (1,)


# ---------------------------------------------------------------------- latent normalisation


def test_normalize_uses_image_factors_on_frame_zero_only():
    z = torch.randn(2, 4, 3, 2, 2)
    s = SCHEMES["pyramid-flow"]
    out = normalize(z, "pyramid-flow")
    torch.testing.assert_close(out[:, :, 0], (z[:, :, 0] - 0.1490) / 1.8415)
    torch.testing.assert_close(out[:, :, 1:], (z[:, :, 1:] + 0.2343) / 3.0986)
    torch.testing.assert_close(normalize(z[:, :, :1], s), (z[:, :, :1] - 0.1490) / 1.8415)  # T == 1 is an image
    torch.testing.assert_close(normalize(z, s, start_frame=3), (z + 0.2343) / 3.0986)  # a later chunk


def test_denormalize_inverts_normalize_per_scheme():
    z = torch.randn(1, 16, 4, 3, 3)
    custom = LatentNorm(image_shift=0.5, image_scale=2.0, video_shift=-1.0, video_scale=0.25)
    for scheme in [*SCHEMES, custom]:
        torch.testing.assert_close(denormalize(normalize(z, scheme), scheme), z, atol=1e-5, rtol=1e-5)
    a, b = normalize(z, "neodragon"), normalize(z, "pyramid-flow")
    assert not torch.equal(a[:, :, :1], b[:, :, :1])  # 0.5430 vs 1/1.8415 differ slightly
    assert SCHEMES["neodragon"].video_scale == 0.3031
    assert not math.isclose(SCHEMES["pyramid-flow"].video_scale, 0.3031, rel_tol=1e-3)


def _correlated_latents(n: int, seed: int) -> torch.Tensor:
    """[n, 4, 3, 5, 5] latents whose cells mostly vary along one direction, as a trained VAE's do."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.tensor([[3.0, 0.0, 0.0, 0.0], [2.9, 0.3, 0.0, 0.0], [2.8, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.5]])
    cells = torch.randn(n * 3 * 25, 4, generator=g) @ mixing.T + torch.tensor([1.0, -2.0, 0.5, 0.0])
    return cells.reshape(n, 3, 5, 5, 4).movedim(-1, 1)


def test_whitening_gives_every_direction_unit_variance_and_inverts():
    z = _correlated_latents(400, 0)
    white = Whitening.measure(z, floor=1e-6)
    y = white.apply(z).movedim(1, -1).reshape(-1, 4)
    torch.testing.assert_close(torch.cov(y.T), torch.eye(4), atol=2e-3, rtol=0)
    torch.testing.assert_close(y.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(white.apply(white.apply(z), inverse=True), z, atol=1e-4, rtol=1e-4)
    # the floor keeps a near-empty direction small: variance v / (v + floor)
    floored = Whitening.measure(z, floor=0.01).apply(_correlated_latents(400, 1)).movedim(1, -1).reshape(-1, 4)
    assert floored.var(0)[0] == pytest.approx(1.0, abs=0.05) and floored.var(0)[-1] < 0.6


def test_whitened_norm_roundtrips_through_json_per_frame_group():
    z = _correlated_latents(50, 2)
    image, video = Whitening.measure(z[:, :, :1], 0.01), Whitening.measure(z[:, :, 1:], 0.01)
    norm = LatentNorm(0.5, 2.0, -1.0, 0.25, image.to_dict(), video.to_dict())
    loaded = LatentNorm(**json.loads(json.dumps(norm.to_dict())))
    out = normalize(z, loaded)
    torch.testing.assert_close(out[:, :, :1], image.apply((z[:, :, :1] - 0.5) * 2.0))
    torch.testing.assert_close(out[:, :, 1:], video.apply((z[:, :, 1:] + 1.0) * 0.25))
    torch.testing.assert_close(normalize(z[:, :, 1:], loaded, start_frame=1), out[:, :, 1:])
    torch.testing.assert_close(denormalize(out, loaded), z, atol=1e-4, rtol=1e-4)
    assert set(SCHEMES["neodragon"].to_dict()) == {"image_shift", "image_scale", "video_shift", "video_scale"}


def test_unknown_scheme_suggests_known_names():
    with pytest.raises(UnknownNameError, match="did you mean 'neodragon'"):
        normalize(torch.zeros(1, 1, 1, 1, 1), "neodragn")


def test_inference_convs_take_onednn_and_match_the_autograd_path(pf, monkeypatch):
    """Batch-1 streamed decoding calls oneDNN's conv directly (PyTorch's dispatch would pick its slower
    im2col conv3d for such small inputs); the frames equal the ordinary path's, which autograd uses."""
    calls = []
    onednn = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(1) or onednn(*a))
    latents = _latents(3)
    with torch.no_grad():
        fast = torch.cat(list(pf.stream_decode(latents.split(1, dim=2))), dim=2)
    assert calls
    calls.clear()
    ordinary = torch.cat(list(pf.stream_decode(latents.split(1, dim=2))), dim=2)  # grad enabled: nn.Conv3d
    assert not calls
    torch.testing.assert_close(fast, ordinary.detach(), atol=1e-5, rtol=1e-5)
