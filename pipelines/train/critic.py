"""The adversarial critic `train-vae` trains against its decoder when `loss.adversarial` > 0."""

from __future__ import annotations

import torch
from torch import nn

from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE


class FrameCritic(nn.Module):
    """Patch discriminator on frames `[N, 3, H, W]` in [-1, 1] -> logits `[N, 1, H/4 - 2, W/4 - 2]`, one per
    34-pixel patch (PatchGAN layout: strided 4x4 convolutions, GroupNorm, LeakyReLU)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int, norm: bool = True) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 4, stride, 1), *([nn.GroupNorm(8, c_out)] if norm else []), nn.LeakyReLU(0.2)]

        self.net = nn.Sequential(*block(3, width, 2, norm=False), *block(width, 2 * width, 2),
                                 *block(2 * width, 4 * width, 1), nn.Conv2d(4 * width, 1, 4, 1, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames)


class VAEWithCritic(nn.Module):
    """What `train-vae` optimises when `loss.adversarial` > 0: the VAE and the critic of its frames, under one
    optimizer. `critic_batches` counts the critic's batches (checkpointed, so a resume keeps the warm-up)."""

    def __init__(self, vae: CausalVideoVAE, critic: FrameCritic):
        super().__init__()
        self.vae, self.critic = vae, critic
        self.register_buffer("critic_batches", torch.zeros((), dtype=torch.long))


def adversarial_loss(model: VAEWithCritic, clips: torch.Tensor, recon: torch.Tensor, reconstruction: torch.Tensor, *,
                     strength: float, warm_up: int, frames: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Hinge GAN terms on `frames` random frames of each clip. The critic's loss sees the reconstruction
    detached and the decoder's sees the critic's weights detached, so one optimizer step moves each net
    by its own objective only. After `warm_up` critic batches the decoder's term is scaled so that its
    gradient at the decoder's last layer is `strength` times that of the `reconstruction` loss (VQGAN's
    adaptive weight): plain pixel losses draw the mean of what a latent could be, a blur; the critic
    pays for edges."""
    _, _, t, h, w = clips.shape
    pick = torch.randperm(t, generator=generator)[:frames]
    real, fake = (x[:, :, pick].transpose(1, 2).reshape(-1, 3, h, w) for x in (clips.float(), recon))
    critic_loss = torch.relu(1 - model.critic(real)).mean() + torch.relu(1 + model.critic(fake.detach())).mean()
    frozen = {name: p.detach() for name, p in model.critic.named_parameters()}
    decoder_loss = -torch.func.functional_call(model.critic, frozen, (fake,)).mean()
    model.critic_batches += 1
    weight = torch.zeros(())  # built from gradients taken without a graph: a constant for the backward
    if model.critic_batches > warm_up:
        last = model.vae.decoder.conv_out.conv.weight
        pixel_grad, = torch.autograd.grad(reconstruction, last, retain_graph=True)
        critic_grad, = torch.autograd.grad(decoder_loss, last, retain_graph=True)
        weight = strength * (pixel_grad.norm() / (critic_grad.norm() + 1e-4)).clamp(max=1e4)
    loss = critic_loss + weight * decoder_loss
    return loss, {"critic": critic_loss.detach(), "adversarial": decoder_loss.detach(), "adversarial_weight": weight}
