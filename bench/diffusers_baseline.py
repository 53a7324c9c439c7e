"""diffusers baselines (a benchmark-only dependency; nothing in ddpm/ imports diffusers).

- Net: ``UNet2DModel`` in the configuration of google/ddpm-cifar10-32 (DDPM-CIFAR10: widths 128, 256,
  256, 256, two res blocks per level, one-head attention at 16×16, dropout 0.1), plus
  ``num_class_embeds=11`` (10 classes + null) so that it matches our class-conditional net
  (35,751,939 parameters, the same count as ``cifar_unet`` with num_classes=10).
- Training step: the loop of diffusers' examples/unconditional_image_generation/train_unconditional.py
  without accelerate: ``DDPMScheduler.add_noise``, eps-MSE, AdamW, ``loss.detach().item()`` every step
  for the progress bar, optional bf16 autocast. Data is handed to it already on the GPU (a kinder
  baseline than the example's DataLoader).
- Sampling: ``DDIMScheduler`` with cond + uncond batched into one forward per step, as the diffusers
  pipelines do classifier-free guidance.
"""
import torch
import torch.nn.functional as F


def ddpm_cifar10_unet(base: int = 128, num_class_embeds: int = 11):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(base, 2 * base, 2 * base, 2 * base),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, dropout=0.1, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
        freq_shift=1, num_class_embeds=num_class_embeds,
    )


def forward(net, x, t, y):
    """Our (x, t, y) convention on a UNet2DModel (for FLOP counting)."""
    return net(x, t, class_labels=y).sample


class DiffusersTrainer:
    """One train_unconditional.py-style step per ``step(x, y)``; x in [-1, 1] on the device."""

    def __init__(self, net, device, bf16: bool, lr: float = 1e-4, p_uncond: float = 0.1, null_class: int = 10):
        from diffusers import DDPMScheduler

        self.net, self.device, self.p_uncond, self.null = net.to(device).train(), device, p_uncond, null_class
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
        self.losses = []

    def step(self, x, y) -> None:
        noise = torch.randn_like(x)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x.shape[0],), device=x.device)
        noisy = self.scheduler.add_noise(x, noise, t)
        y = torch.where(torch.rand(x.shape[0], device=x.device) < self.p_uncond, torch.full_like(y, self.null), y)
        with self.autocast:
            pred = self.net(noisy, t, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.losses.append(loss.detach().item())


@torch.no_grad()
def sample_ddim_cfg(net, labels, steps: int, w: float, device, generator, bf16: bool = False, null_class: int = 10):
    """64 CIFAR images the diffusers way: DDIMScheduler(50 steps), eta 0, CFG ``(1 + w) e_c - w e_u``."""
    from diffusers import DDIMScheduler

    net.eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(steps)
    y = labels.to(device)
    y2 = torch.cat([y, torch.full_like(y, null_class)])
    x = torch.randn((len(y), 3, 32, 32), generator=generator, device=device)
    for t in scheduler.timesteps:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = net(torch.cat([x, x]), t, class_labels=y2).sample
        cond, uncond = out.float().chunk(2)
        eps = (1 + w) * cond - w * uncond
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x
