"""The CS180 (Berkeley, project 5B) class-conditional DDPM recipe as the course notebooks run it: the baseline.

Training: torchvision ``MNIST`` with ``ToTensor()`` (images in [0, 1], decoded from PIL one by one),
``DataLoader(batch_size=128, shuffle=True)`` in the main process, fp32, ``.to(device)`` per batch, Adam
1e-3, eps-MSE at uniform random t, labels dropped to the null class with p = 0.1, and ``loss.item()``
every step (the notebooks append every loss to a list for their curve).
Sampling: the DDPM loop with two separate forward passes (conditional, unconditional) per step, fp32,
schedule tensors indexed on the device, the course's x0-form update.

The net is ``ddpm.nets`` cs180_class_unet: the course's layout, with the null class as an index
(= num_classes) rather than a zeroed one-hot, which costs the same.
"""
import torch
import torch.nn.functional as F


def course_schedule(T: int, device):
    betas = torch.linspace(1e-4, 0.02, T, device=device)
    alphas = 1 - betas
    return betas, alphas, torch.cumprod(alphas, 0)


def mnist_loader(root, batch_size: int = 128):
    """The course's data pipeline. Needs MNIST unpacked in ROOT/MNIST/raw (python -m jobs.prepare_data)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(str(root), train=True, download=False, transform=transforms.ToTensor())
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


def endless(loader):
    while True:
        yield from loader


class CourseTrainer:
    """One course-recipe optimizer step per ``step(x, y)``; x, y straight from the DataLoader (on CPU)."""

    def __init__(self, net, T: int, device, lr: float = 1e-3, p_uncond: float = 0.1):
        self.net, self.T, self.device, self.p_uncond = net.to(device).train(), T, device, p_uncond
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)
        self.betas, self.alphas, self.alpha_bars = course_schedule(T, device)
        self.losses = []

    def step(self, x, y) -> None:
        x, y = x.to(self.device), y.to(self.device)
        t = torch.randint(0, self.T, (x.shape[0],), device=self.device)
        eps = torch.randn_like(x)
        ab = self.alpha_bars[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * eps
        drop = torch.rand(x.shape[0], device=self.device) < self.p_uncond
        y = torch.where(drop, torch.full_like(y, self.net.num_classes), y)
        loss = F.mse_loss(self.net(x_t, t, y), eps)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.losses.append(loss.item())


@torch.no_grad()
def course_sample_cfg(net, labels, T: int, gamma: float, device, generator, shape=(1, 28, 28)):
    """CFG DDPM sampling as the course does it: two forwards per step. labels: LongTensor (B,)."""
    net.eval()
    betas, alphas, alpha_bars = course_schedule(T, device)
    B = labels.shape[0]
    y = labels.to(device)
    null = torch.full_like(y, net.num_classes)
    x = torch.randn((B, *shape), generator=generator, device=device)
    for t in range(T - 1, -1, -1):
        tt = torch.full((B,), t, device=device, dtype=torch.long)
        eps_c = net(x, tt, y)
        eps_u = net(x, tt, null)
        eps = eps_u + gamma * (eps_c - eps_u)
        ab_t = alpha_bars[t]
        ab_prev = alpha_bars[t - 1] if t > 0 else torch.ones((), device=device)
        x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
        mean = ab_prev.sqrt() * betas[t] / (1 - ab_t) * x0 + alphas[t].sqrt() * (1 - ab_prev) / (1 - ab_t) * x
        if t > 0:
            z = torch.randn(x.shape, generator=generator, device=device)
            x = mean + betas[t].sqrt() * z
        else:
            x = mean
    return x

