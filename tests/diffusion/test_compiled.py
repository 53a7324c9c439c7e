"""ddpm.diffusion.compiled (sampling): a no-op off CUDA; on CUDA the compiled paths match eager sampling.

The CUDA tests compare in full float32 (:func:`ieee_fp32`): with TF32 convolutions the eager reference
itself is off by more than the tolerance that would catch a wrong compiled path."""
import pytest
import torch

from ddpm.diffusion.compiled import compile_for_sampling, ieee_fp32
from ddpm.diffusion.samplers import classifier_free_guidance, ddim_timesteps, sample_ddim
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.nets.registry import build_net


def test_cpu_returns_the_model_itself():
    net = build_net("cs180_class_unet", hidden=8)
    assert compile_for_sampling(net, "cpu") is net
    assert compile_for_sampling(net, torch.device("cpu"), bf16=False, compile=False) is net


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("opts", [dict(bf16=True, compile=False, cuda_graphs=False),
                                  dict(bf16=False, compile=True, cuda_graphs=False),
                                  dict(bf16=True, compile=True, cuda_graphs=True)])
@ieee_fp32()
def test_cuda_paths_match_eager(opts):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    net = build_net("cifar_unet", base=32).to(dev).eval()
    for p in net.parameters():  # the zero-initialised output conv would make every path output 0
        p.data.normal_(0, 0.02)
    guided = classifier_free_guidance(net, 2.0, "w")
    sched = NoiseSchedule.make("linear", 1000, 1e-4, 0.02)
    y = torch.arange(8, device=dev) % 10
    x_T = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)
    ref = sample_ddim(guided, x_T, ddim_timesteps(1000, 10), y, schedule=sched)
    torch._dynamo.reset()
    fast = compile_for_sampling(guided, dev, **opts)
    x = torch.randn(8, 3, 32, 32, device=dev)
    t = torch.full((8,), 500, device=dev)
    first = fast(x, t, y)
    kept = first.clone()
    fast(torch.randn_like(x), t, y)  # a later call must not overwrite an output the caller still holds
    assert torch.equal(first, kept)
    assert first.dtype == torch.float32
    out = sample_ddim(fast, x_T, ddim_timesteps(1000, 10), y, schedule=sched)
    tol = 0.1 if opts["bf16"] else 1e-3
    assert (out - ref).abs().max().item() < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@ieee_fp32()
def test_cuda_one_compilation_serves_every_guidance_scale():
    """jobs.sample's path: the net compiled once, guidance applied around it; a second scale recompiles nothing."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    dev = torch.device("cuda")
    net = build_net("cifar_unet", base=32, num_classes=10).to(dev).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.02)
    sched = NoiseSchedule.make("linear", 1000, 1e-4, 0.02)
    y = torch.arange(8, device=dev) % 10
    x_T = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)
    torch._dynamo.reset()
    counters.clear()
    fast = compile_for_sampling(net, dev, bf16=True, compile=True, cuda_graphs=True)
    outs = {}
    for scale in (1.0, 3.0):
        guided = classifier_free_guidance(fast, scale, "w", num_classes=10)
        outs[scale] = sample_ddim(guided, x_T, ddim_timesteps(1000, 5), y, schedule=sched)
        if scale == 1.0:
            frames = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == frames  # no new graph for the second scale
    eager = sample_ddim(classifier_free_guidance(net, 3.0, "w", num_classes=10), x_T, ddim_timesteps(1000, 5), y,
                        schedule=sched)
    assert (outs[3.0] - eager).abs().max().item() < 0.1
