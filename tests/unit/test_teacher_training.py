"""Pieces of the Shapes teacher's stage 2 that steer what the MMDiT learns: the object-weighted flow
loss (latent object masks from the scene), the extra first-frame share of the temporal pyramid and
the first-frame image batches; and the VAE's colour tie and read-out."""

import numpy as np
import pytest
import torch

from neodragon_cli.pipelines.data.shapes import BACKGROUNDS, Scene, ShapeObject, ShapesWorld, caption, video_tensor
from neodragon_cli.pipelines.flow.losses import build_flow_batch, flow_matching_loss
from neodragon_cli.pipelines.flow.sampler import SeededNoise, TextConditioning
from neodragon_cli.pipelines.models.latents import LatentNorm, normalize
from neodragon_cli.pipelines.data import latent_cache
from neodragon_cli.pipelines.data.latent_cache import (
    encode_image_cache,
    encode_latent_cache,
    encode_videos,
    encoder_fingerprint,
    latent_object_mask,
)
from neodragon_cli.pipelines.data.world_section import WorldSection
from neodragon_cli.pipelines.eval.reconstruction import latent_colour_readout
from neodragon_cli.pipelines.train.critic import FrameCritic, VAEWithCritic
from neodragon_cli.pipelines.train.train_t2v import TrainT2VRecipe, _dataset, flow_batches, draw_units
from neodragon_cli.pipelines.train.train_vae import TrainVAERecipe, _edges, object_latent_noise, pooled_colour, vae_loss

SCENES = [
    Scene("black", (ShapeObject("circle", "red", "small", "static", 0.5, 0.5),)),
    Scene("navy", (ShapeObject("square", "white", "large", "right", 0.3, 0.6),)),
    Scene("gray", (ShapeObject("triangle", "blue", "small", "up", 0.25, 0.7),
                   ShapeObject("circle", "yellow", "large", "down", 0.7, 0.3))),
]


def _tiny_vae_recipe() -> TrainVAERecipe:
    """A train-vae recipe at toy widths (8 channels a level, 4 GroupNorm groups)."""
    recipe = TrainVAERecipe()
    recipe.model.block_out_channels, recipe.model.norm_num_groups = [8, 8, 8, 8], 4
    return recipe


@pytest.mark.parametrize("scene", SCENES)
def test_latent_object_mask_covers_every_rendered_object_pixel_and_little_else(scene):
    world = ShapesWorld(frames=17)
    frames = world.render(scene).astype(int)
    touched = np.abs(frames - np.asarray(BACKGROUNDS[scene.background])).sum(-1) > 0  # [T, H, W]
    mask = latent_object_mask(world, scene, (16, 16))
    assert mask.shape == (3, 16, 16)
    for k in range(3):
        span = touched[:1] if k == 0 else touched[8 * k - 7 : 8 * k + 1]
        cells = span.any(0).reshape(16, 8, 16, 8).any((1, 3))  # latent cells with an object pixel
        assert mask[k][cells].all()
        # the box over-covers only by the cells a shape's corners miss, plus one partial cell a side
        assert mask[k].sum() <= (cells.sum(0).max() + 2) * (cells.sum(1).max() + 2) * len(scene.objects)


def test_moving_object_mask_follows_the_motion():
    scene = SCENES[1]  # moving right
    mask = latent_object_mask(ShapesWorld(), scene, (16, 16))
    columns = [np.flatnonzero(m.any(0)) for m in mask]
    assert columns[-1].min() > columns[0].min() and columns[-1].max() > columns[0].max()
    rows = [np.flatnonzero(m.any(1)) for m in mask]
    assert all((r == rows[0]).all() for r in rows)


def test_first_frame_share_draws_frame_zero_that_often():
    generator = torch.Generator().manual_seed(0)
    assert all(draw_units(generator, 7, 1.0) == [1, 1, 1] for _ in range(20))
    for share in (0.0, 0.5):
        draws = np.array([draw_units(generator, 7, share) for _ in range(3000)])
        assert draws.min() == 1 and draws.max() == 7
        assert (draws == 1).mean() == pytest.approx(share + (1 - share) / 7, abs=0.02)


def _batch(focus, focus_weight, temporal=True):
    torch.manual_seed(0)
    latents = torch.randn(4, 16, 3, 16, 16)
    text = TextConditioning(torch.randn(4, 5, 8), torch.ones(4, 5, dtype=torch.long), torch.randn(4, 6))
    null = TextConditioning(torch.zeros(1, 5, 8), torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 6))
    return build_flow_batch(latents, text, null, SeededNoise(1), temporal_pyramid=temporal, units_per_stage=(1, 2, 3),
                            focus=focus, focus_weight=focus_weight)


def test_focus_weights_follow_the_mask_at_each_pyramid_level():
    focus = torch.zeros(4, 3, 16, 16)
    focus[:, :, 4:8, 8:12] = 1
    batch = _batch(focus, 8.0)
    for column in batch.columns:
        weight, target = column.weight, column.target
        assert weight.shape[0] == target.shape[0] and weight.shape[2:] == target.shape[2:]
        scale = 16 // target.shape[-1]  # 4, 2, 1 for stages 0, 1, 2
        cell = slice(4 // scale, 8 // scale), slice(8 // scale, 12 // scale)
        assert torch.all(weight[..., cell[0], cell[1]] == 9.0)
        outside = torch.ones_like(weight, dtype=torch.bool)
        outside[..., cell[0], cell[1]] = False
        assert torch.all(weight[outside] == 1.0)


def test_weighted_loss_counts_object_cells_more_and_reduces_to_plain_mse():
    focus = torch.zeros(4, 3, 16, 16)
    focus[:, :, 4:8, 8:12] = 1
    plain, weighted, empty = _batch(None, 0.0), _batch(focus, 8.0), _batch(torch.zeros_like(focus), 8.0)
    assert all(c.weight is None for c in plain.columns)

    def predictions(batch, inside: bool):
        preds = []
        for c in batch.columns:
            scale = 16 // c.target.shape[-1]
            delta = torch.zeros_like(c.target)
            delta[..., 4 // scale : 8 // scale, 8 // scale : 12 // scale] = 1.0
            preds.append(c.target + (delta if inside else 1 - delta))
        return preds

    # the same draws: every batch has identical targets, only the weights differ
    for a, b in zip(plain.columns, weighted.columns):
        torch.testing.assert_close(a.target, b.target)
    for inside in (True, False):
        torch.testing.assert_close(flow_matching_loss(predictions(empty, inside), empty).loss,
                                   flow_matching_loss(predictions(plain, inside), plain).loss)
    assert (flow_matching_loss(predictions(weighted, True), weighted).loss
            > 2 * flow_matching_loss(predictions(plain, True), plain).loss)
    assert (flow_matching_loss(predictions(weighted, False), weighted).loss
            < flow_matching_loss(predictions(plain, False), plain).loss)


def test_recipe_rejects_bad_focus_settings():
    recipe = TrainT2VRecipe()
    recipe.flow.object_weight, recipe.flow.first_frame_share = -1.0, 1.5
    problems = recipe.validate()
    assert any("flow.object_weight" in p for p in problems) and any("flow.first_frame_share" in p for p in problems)


def test_pooled_colour_is_the_mean_of_the_pixels_each_latent_cell_encodes():
    world = ShapesWorld(frames=17)
    clip = world.render(SCENES[2]).astype(np.float64) / 127.5 - 1  # [T, H, W, 3]
    pooled = pooled_colour(torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float())
    assert pooled.shape == (1, 3, 3, 16, 16)
    for k, frames in enumerate([clip[:1], clip[1:9], clip[9:17]]):
        expected = frames.reshape(len(frames), 16, 8, 16, 8, 3).mean((0, 2, 4))  # [16, 16, 3]
        np.testing.assert_allclose(pooled[0, :, k].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_linear_colour_loss_ties_latent_channels_0_to_2_to_pooled_colour():
    recipe = _tiny_vae_recipe()
    recipe.loss.linear_colour = 1.0
    torch.manual_seed(0)
    vae = recipe.model.build()
    clips = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    loss, metrics = vae_loss(recipe.loss)(vae, clips, torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = vae.encode(clips).mean
    expected = ((mean[:, :3] - pooled_colour(clips)) ** 2).mean()
    torch.testing.assert_close(metrics["linear_colour"], expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert vae.encoder.conv_in.conv.weight.grad.abs().sum() > 0
    recipe.loss.linear_colour = 0.0
    assert "linear_colour" not in vae_loss(recipe.loss)(vae, clips, torch.Generator().manual_seed(0))[1]


def test_linear_colour_needs_a_trained_encoder():
    recipe = TrainVAERecipe()
    recipe.loss.linear_colour, recipe.model.train_encoder = 1.0, False
    assert any("loss.linear_colour" in p for p in recipe.validate())
    recipe.loss.linear_colour = -1.0
    assert any("loss.linear_colour must be >= 0" in p for p in recipe.validate())


def test_latent_noise_lands_on_the_cells_around_objects_at_the_asked_scale():
    world = ShapesWorld(frames=17)
    clips = torch.stack([video_tensor(world.render(scene)) for scene in SCENES[:2]])  # [2, 3, 17, 128, 128]
    latents = torch.randn(2, 16, 3, 16, 16) * torch.linspace(0.1, 3.0, 16)[None, :, None, None, None]
    noise = object_latent_noise(latents, clips, 1.0, torch.Generator().manual_seed(0))
    assert noise.shape == latents.shape
    torch.testing.assert_close(noise, object_latent_noise(latents, clips, 1.0, torch.Generator().manual_seed(0)))
    # the static small circle at the centre: its cells and their neighbours, nothing farther
    circle = latent_object_mask(world, SCENES[0], (16, 16))  # [3, 16, 16] cells the object's box covers
    near = torch.nn.functional.max_pool2d(torch.from_numpy(circle).float(), 3, stride=1, padding=1) > 0
    noisy = (noise[0] != 0).any(0)
    assert noisy.any() and not noisy[~near].any()
    # per-channel std follows the channel's: a channel 30x wider gets 30x the noise, within sampling error
    ratio = noise.std(dim=(0, 2, 3, 4)) / latents.std(dim=(0, 2, 3, 4))
    assert float(ratio.max() / ratio.min()) < 1.6 and 0 < float(ratio.max()) < 1.0
    assert not object_latent_noise(latents, clips, 0.0, torch.Generator().manual_seed(0)).any()


def _loss_changes_with(setting: str, value: float, scene: Scene) -> TrainVAERecipe:
    """Check that `loss.<setting> = value` changes the toy VAE's loss on a rendered scene; return the recipe."""
    recipe = _tiny_vae_recipe()
    torch.manual_seed(0)
    vae = recipe.model.build()
    clips = video_tensor(ShapesWorld(frames=9).render(scene))[None]

    def loss() -> float:
        return vae_loss(recipe.loss)(vae, clips, torch.Generator().manual_seed(0))[0].item()

    plain = loss()
    setattr(recipe.loss, setting, value)
    assert loss() != plain
    return recipe


def test_latent_noise_changes_what_the_decoder_is_trained_on():
    recipe = _loss_changes_with("latent_noise", 1.0, SCENES[0])
    recipe.loss.latent_noise = -0.5
    assert any("loss.latent_noise must be >= 0" in p for p in recipe.validate())


def test_edge_weight_marks_the_outline_of_a_rendered_square():
    clips = -torch.ones(1, 3, 1, 32, 32)
    clips[..., 8:20, 10:24] = 0.8
    edges = _edges(clips)[0, 0, 0]
    outline = torch.zeros(32, 32)
    outline[6:22, 8:26] = 1
    outline[10:18, 12:22] = 0  # steps lie between pixels 7|8, 19|20 (rows) and 9|10, 23|24 (columns): 2 px each side
    outline[[6, 6, 21, 21], [8, 25, 8, 25]] = 0  # the outer corners are 2 px diagonally from the nearest step pixel
    torch.testing.assert_close(edges, outline)
    recipe = _loss_changes_with("edge", 8.0, SCENES[1])
    recipe.loss.edge = -1.0
    assert any("loss.edge must be >= 0" in p for p in recipe.validate())


def test_adversarial_terms_move_the_critic_and_the_decoder_each_by_its_own_objective():
    recipe = _tiny_vae_recipe()
    recipe.loss.adversarial, recipe.loss.adversarial_start, recipe.loss.critic_frames = 0.5, 1, 3
    torch.manual_seed(0)
    model = VAEWithCritic(recipe.model.build(), FrameCritic(width=8))
    clips = video_tensor(ShapesWorld(frames=9).render(SCENES[1]))[None, :, :, 32:96, 32:96]
    loss_fn = vae_loss(recipe.loss)
    _, warm_up = loss_fn(model, clips, torch.Generator().manual_seed(1))
    assert warm_up["adversarial_weight"] == 0 and int(model.critic_batches) == 1
    loss, metrics = loss_fn(model, clips, torch.Generator().manual_seed(1))
    assert metrics["adversarial_weight"] > 0
    model.zero_grad()
    loss.backward()
    # the critic's gradient is that of its hinge loss alone: the decoder's term does not reach it
    pick = torch.randperm(9, generator=torch.Generator().manual_seed(1))[:3]
    with torch.no_grad():
        recon = model.vae.decode(model.vae.encode(clips).mode()).float()
    real, fake = (x[0, :, pick].transpose(0, 1) for x in (clips, recon))
    critic = FrameCritic(width=8)
    critic.load_state_dict(model.critic.state_dict())
    hinge = torch.relu(1 - critic(real)).mean() + torch.relu(1 + critic(fake)).mean()
    hinge.backward()
    for (name, p), q in zip(model.critic.named_parameters(), critic.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)
    # the decoder's gradient is the pixel loss's plus the critic's
    decoder_grad = model.vae.decoder.conv_out.conv.weight.grad.clone()
    model.zero_grad()
    recipe.loss.adversarial = 0.0
    vae_loss(recipe.loss)(model.vae, clips, torch.Generator().manual_seed(1))[0].backward()
    assert not torch.allclose(decoder_grad, model.vae.decoder.conv_out.conv.weight.grad)


class _FakeVAE(torch.nn.Module):
    """An 'encoder' with a chosen latent code: `code(video)` -> [B, 16, T', H/8, W/8]."""

    def __init__(self, code):
        super().__init__()
        self.code = code

    def encode(self, video):
        return type("Posterior", (), {"mean": self.code(video)})()


def test_latent_colour_readout_tells_a_linear_colour_code_from_no_code():
    world = WorldSection(frames=9)

    def linear(video):
        colour = pooled_colour(torch.cat([video, video[:, :, :1].expand(-1, -1, 8, -1, -1)], 2))[:, :, :1]
        return torch.cat([colour, torch.zeros(colour.shape[0], 13, *colour.shape[2:])], 1)

    def blind(video):
        return torch.ones(video.shape[0], 16, 1, video.shape[-2] // 8, video.shape[-1] // 8)

    readable = latent_colour_readout(_FakeVAE(linear), world, 160)
    assert set(readable) == {"level0", "level1", "level2"}
    assert min(readable.values()) > 0.9
    assert max(latent_colour_readout(_FakeVAE(blind), world, 160).values()) < 0.3


def test_rendering_only_the_first_frames_matches_the_whole_clip():
    world = ShapesWorld(frames=17)
    for scene in SCENES:
        np.testing.assert_array_equal(world.render(scene, frames=1), world.render(scene)[:1])
        np.testing.assert_array_equal(world.render(scene, frames=5), world.render(scene)[:5])


def _image_recipe(images: int = 6, share: float = 0.5) -> TrainT2VRecipe:
    recipe = TrainT2VRecipe()
    recipe.world = WorldSection(height=64, width=64, frames=9)
    recipe.data.videos, recipe.data.images, recipe.data.image_share = 5, images, share
    recipe.train.batch_size = 4
    return recipe


def test_image_batches_come_at_the_share_and_describe_the_image_scenes():
    recipe = _image_recipe()
    recipe.flow.object_weight = 1.0
    videos = torch.zeros(5, 16, 2, 8, 8)
    images = torch.arange(6.0).view(6, 1, 1, 1, 1).expand(6, 16, 1, 8, 8).contiguous()  # image i is all i
    batch = flow_batches(recipe, videos, images)
    dataset, seen = _dataset(recipe), 0
    for step in range(400):
        positions = range(4 * step, 4 * step + 4)
        out = batch(positions)
        if out["latents"].shape[2] == 2:
            assert out["object_masks"].shape == (4, 2, 8, 8)
            continue
        seen += 1
        assert out["object_masks"].shape == (4, 1, 8, 8)
        for row, p, text in zip(out["latents"], positions, out["captions"]):
            i = int(row[0, 0, 0, 0])
            scene = dataset.item(recipe.data.videos + i)[0]  # the scenes after the videos
            assert text == caption(scene, np.random.default_rng((recipe.world.seed, p, 2))).text
    assert 0.4 < seen / 400 < 0.6
    recipe.data.image_share = 0.0
    only_videos = flow_batches(recipe, videos, images)
    assert all(only_videos(range(4 * s, 4 * s + 4))["latents"].shape[2] == 2 for s in range(50))


def _tiny_vae():
    torch.manual_seed(0)
    return _tiny_vae_recipe().model.build().eval()


_NORM = LatentNorm(image_shift=0.1, image_scale=2.0, video_shift=-0.3, video_scale=0.5)


def test_image_cache_holds_the_first_latent_frame_of_each_scene_video(tmp_path, monkeypatch):
    recipe = _image_recipe(images=3)
    vae, norm = _tiny_vae(), _NORM

    def image_cache():  # the scenes after the videos
        return encode_image_cache(recipe.world, recipe.data.videos, recipe.data.images, vae, norm, tmp_path / "images.safetensors")

    images = image_cache()
    assert images.shape == (3, 16, 1, 8, 8)
    dataset = _dataset(recipe)
    whole = torch.stack([dataset[recipe.data.videos + i][0] for i in range(3)])
    expected = normalize(encode_videos(vae, whole), norm)[:, :, :1]
    torch.testing.assert_close(images, expected, atol=0.05 * expected.abs().max().item(), rtol=0)
    # cached: a second call reads the file instead of encoding
    monkeypatch.setattr(latent_cache, "encode_videos", _refuse)
    torch.testing.assert_close(image_cache(), images)
    monkeypatch.undo()
    # the video cache holds other scenes
    videos = encode_latent_cache(recipe.world, recipe.data.videos, vae, norm, tmp_path / "latents.safetensors")
    assert videos.shape == (5, 16, 2, 8, 8)
    assert not torch.allclose(videos[:3, :, :1], images, atol=1e-2)


def test_a_wider_decoder_starts_fresh_on_the_init_encoder(tmp_path):
    parent = _tiny_vae()
    parent.save_pretrained(tmp_path / "vae")
    recipe = _tiny_vae_recipe()
    recipe.model.init, recipe.model.train_encoder = str(tmp_path / "vae"), False
    recipe.model.decoder_block_out_channels, recipe.model.decoder_layers_per_block = [8, 16, 16, 16], [1, 2, 2, 2]
    assert recipe.validate() == []
    vae = recipe.model.build().eval()
    assert list(vae.config["decoder_block_out_channels"]) == [8, 16, 16, 16]
    assert not any(p.requires_grad for p in vae.encoder.parameters())
    assert any(p.requires_grad for p in vae.decoder.parameters())
    assert encoder_fingerprint(vae, _NORM) == encoder_fingerprint(parent, _NORM)  # same latents, so the MMDiT stays valid
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(video).mode(), parent.encode(video).mode())
        assert vae.decode(vae.encode(video).mode()).shape == video.shape
    recipe.model.decoder_block_out_channels = [8, 16, 16]
    recipe.model.decoder_layers_per_block = [1, 1, 1, 1]
    recipe.model.norm_num_groups = 3
    problems = recipe.validate()
    assert any("one entry per level" in p for p in problems) and any("must divide" in p for p in problems)


def _refuse(*_):
    raise AssertionError("encoded although the cache holds these latents")


def test_latent_cache_is_extended_cut_or_redone_by_its_provenance(tmp_path, monkeypatch):
    recipe, vae, path = _image_recipe(images=0, share=0.0), _tiny_vae(), tmp_path / "latents.safetensors"
    recipe.data.videos = 3

    def cache(at=path):
        return encode_latent_cache(recipe.world, recipe.data.videos, vae, _NORM, at)

    first = cache()
    encoded = []

    def counting(vae, videos):
        encoded.append(len(videos))
        return real(vae, videos)

    real = latent_cache.encode_videos
    monkeypatch.setattr(latent_cache, "encode_videos", counting)
    recipe.data.videos = 5  # grows: only the two new videos are encoded, the first three are kept
    grown = cache()
    assert sum(encoded) == 2 and grown.shape[0] == 5
    torch.testing.assert_close(grown[:3], first)
    fresh = cache(tmp_path / "fresh.safetensors")
    # equal up to the bf16 encode of other batch compositions
    torch.testing.assert_close(grown, fresh, atol=0.01 * fresh.abs().max().item(), rtol=0)
    encoded.clear()
    recipe.data.videos = 2  # shrinks: the prefix, nothing encoded
    torch.testing.assert_close(cache(), first[:2])
    with torch.no_grad():  # a decoder-only change keeps the latents valid
        next(vae.decoder.parameters()).add_(1.0)
    cache()
    assert encoded == []
    with torch.no_grad():  # an encoder change does not
        next(vae.encoder.parameters()).add_(1.0)
    cache()
    assert sum(encoded) == 2
    encoded.clear()
    before = encoder_fingerprint(vae, _NORM)
    vae.config["encoder_norm_num_groups"] = 2  # nor does another encoder config (the groups set the encoding)
    assert encoder_fingerprint(vae, _NORM) != before
    cache()
    assert sum(encoded) == 2
    encoded.clear()
    recipe.world.seed = 7  # other scenes
    cache()
    assert sum(encoded) == 2


def test_recipe_rejects_bad_image_settings():
    recipe = TrainT2VRecipe()
    recipe.data.images, recipe.data.image_share = 0, 0.5
    assert any("data.image_share > 0 needs data.images" in p for p in recipe.validate())
    recipe.data.images, recipe.data.image_share = -1, 2.0
    problems = recipe.validate()
    assert any("data.images must be" in p for p in problems) and any("data.image_share must be" in p for p in problems)


def test_a_deeper_decoder_starts_as_its_parent(tmp_path):
    parent = _tiny_vae()
    parent.save_pretrained(tmp_path / "vae")
    recipe = _tiny_vae_recipe()
    recipe.model.init, recipe.model.train_encoder = str(tmp_path / "vae"), False
    parent_layers = list(parent.config["decoder_layers_per_block"])
    recipe.model.decoder_layers_per_block = [parent_layers[0], parent_layers[1], parent_layers[2] + 1, parent_layers[3] + 2]
    vae = recipe.model.build().eval()
    assert len(vae.decoder.up_blocks[3].resnets) == parent_layers[3] + 2
    latents = torch.randn(1, 16, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(latents), parent.decode(latents))
    # the added resnets can learn: their zeroed convolution gets a gradient
    added = vae.decoder.up_blocks[3].resnets[-1]
    assert added.conv1.conv.weight.abs().sum() > 0 and added.conv2.conv.weight.abs().sum() == 0
    vae.decode(latents).square().mean().backward()
    assert added.conv2.conv.weight.grad.abs().sum() > 0
