"""ddpm.nets: the registry, every net's forward contract, parameter counts, and argument checks."""
import math

import pytest
import torch

from ddpm.errors import UserError
from ddpm.nets.registry import NETS, build_net, net_kwargs

# Small widths so every test is fast on CPU; sizes are pinned separately at the recipe widths.
SMALL = {
    "cs180_denoiser": dict(hidden=8),
    "cs180_time_unet": dict(hidden=8),
    "cs180_class_unet": dict(hidden=8),
    "res_unet": dict(channels=8),
    "cifar_unet": dict(base=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], num_groups=8),
    "noisy_classifier": dict(base=8, ch_mult=[1, 2]),
}
# (id, arch, overrides on SMALL): every arch once, plus the other datasets / embeddings / unconditional.
VARIANTS = [(name, name, {}) for name in SMALL] + [
    ("res_unet-cifar-sine-uncond", "res_unet",
     dict(in_channels=3, image_size=32, time_embedding="sine_mlp", num_classes=0)),
    ("cifar_unet-mnist", "cifar_unet",
     dict(in_channels=1, image_size=28, ch_mult=(1, 2, 2), attn_resolutions=(14, 7), num_classes=10)),
    ("cifar_unet-uncond", "cifar_unet", dict(num_classes=0, attn_resolutions=[])),
    ("cs180_class_unet-cifar", "cs180_class_unet", dict(in_channels=3, image_size=32, num_classes=3)),
    ("noisy_classifier-cifar", "noisy_classifier", dict(in_channels=3, image_size=32, num_classes=10)),
]
BY_ID = {vid: (arch, kw) for vid, arch, kw in VARIANTS}
IDS = list(BY_ID)


def make(vid):
    """A small net in eval mode whose every input carries signal to the output: zero-initialised weights
    (DDPM's output convs) get small random values, and BatchNorm running statistics (CS180 nets) are
    calibrated on one batch. A fresh BatchNorm's statistics (mean 0, variance 1) shrink the activations
    layer by layer, until class and time change the output by 1e-6: the size of float rounding."""
    arch, over = BY_ID[vid]
    torch.manual_seed(0)
    net = build_net(arch, **{**SMALL[arch], **over})
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
        norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if norms:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: the statistics of exactly this batch
            net.train()(*inputs(net, batch=16, seed=2))
            for m in norms:
                m.momentum = 0.1
    return net.eval()


def relative_change(a, b) -> float:
    """Mean |a - b| relative to mean |a|: outputs "differ" only when this is far above float rounding."""
    return ((a - b).abs().mean() / a.abs().mean()).item()


def is_classifier(net):
    return net.arch == "noisy_classifier"


def conditional(net):
    return net.num_classes > 0 and not is_classifier(net)


def inputs(net, batch=2, seed=1):
    """x (B, C, H, W), t LongTensor (B,) distinct per sample, y LongTensor (B,) or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size, generator=g)
    T = getattr(net, "T", 1000)
    t = torch.linspace(1, T - 1, batch).long()
    y = torch.arange(batch) % net.num_classes if conditional(net) else None
    return x, t, y


def n_params(net):
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_registry_holds_every_arch():
    assert sorted(NETS) == sorted(SMALL), "a new net needs a SMALL config here (and its own tests)"


@pytest.mark.parametrize("vid", IDS)
def test_output_shape_and_attributes(vid):
    net = make(vid)
    x, t, y = inputs(net, batch=3)
    out = net(x, t, y)
    expect = (3, net.num_classes) if is_classifier(net) else x.shape
    assert out.shape == expect and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert isinstance(net.time_conditional, bool) and isinstance(net.num_classes, int)
    assert net.time_conditional == (net.arch != "cs180_denoiser")
    assert (net.in_channels, net.image_size) == (x.shape[1], x.shape[2])


# Exact counts pin the architectures; the published / course figures bound them.
COUNTS = [
    ("cs180_denoiser", {}, 7_891_073, None),
    ("cs180_time_unet", {}, 1_996_417, None),
    ("cs180_class_unet", {}, 2_019_393, (2.1e6, 0.05)),
    ("res_unet", {}, 712_289, (0.7e6, 0.15)),
    ("res_unet", dict(channels=64), 2_837_697, None),
    ("cifar_unet", dict(num_classes=0), 35_746_307, (35.7e6, 0.01)),  # DDPM-CIFAR10
    ("cifar_unet", {}, 35_751_939, None),
    ("noisy_classifier", {}, 426_602, None),
]


@pytest.mark.parametrize("arch,kw,exact,target", COUNTS, ids=[f"{a}-{i}" for i, (a, *_) in enumerate(COUNTS)])
def test_parameter_counts(arch, kw, exact, target):
    net = build_net(arch, **kw)
    n = n_params(net)
    if target is not None:
        ref, tol = target
        assert abs(n - ref) / ref < tol, f"{arch}: {n:,} params, expected {ref:,.0f} ± {tol:.0%}"
    assert n == exact, f"{arch}: {n:,} params (update the docs in ddpm/nets/__init__.py if intended)"


def test_ddpm_cifar10_net_runs_a_batch_of_one():
    net = build_net("cifar_unet", num_classes=0).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32), torch.tensor([500]))
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("vid", IDS)
def test_gradients_reach_every_parameter(vid):
    net = make(vid).train()
    x, t, y = inputs(net, batch=3)
    if conditional(net):
        y[-1] = net.num_classes  # the null class is trained too
    out = net(x, t, y)
    if is_classifier(net):
        loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 1]))
    else:
        loss = out.pow(2).mean()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    # Unused embedding rows may be zero, but the bulk of the net must actually learn.
    assert sum(bool(p.grad.any()) for p in net.parameters()) > 0.9 * len(list(net.parameters()))


COND = [v for v in IDS if conditional(make(v))]
UNCOND = [v for v in IDS if make(v).num_classes == 0]
TIMED = [v for v in IDS if make(v).time_conditional]


def test_variant_groups_are_not_empty():
    assert len(COND) >= 4 and len(UNCOND) >= 4 and len(TIMED) >= 8


@pytest.mark.parametrize("vid", COND)
def test_y_none_is_the_null_class(vid):
    net = make(vid)
    x, t, _ = inputs(net)
    null = torch.full((2,), net.num_classes)
    with torch.no_grad():
        assert torch.equal(net(x, t, None), net(x, t, null))


# The gradient of each conditional arch's null-class slot (index num_classes) after a backward pass.
NULL_SLOT_GRAD = {
    "cs180_class_unet": lambda net: net.c_embed1[0].weight.grad[:, net.num_classes],
    "res_unet": lambda net: net.class_embed.weight.grad[net.num_classes],
    "cifar_unet": lambda net: net.class_embed.weight.grad[net.num_classes],
}


@pytest.mark.parametrize("vid", COND)
def test_null_class_is_a_learned_slot_not_a_zero_vector(vid):
    net = make(vid)
    x, t, _ = inputs(net)
    net(x, t, None).pow(2).mean().backward()
    # A zero-vector null would leave its slot's gradient exactly zero.
    assert NULL_SLOT_GRAD[net.arch](net).abs().sum() > 0


@pytest.mark.parametrize("vid", COND)
def test_classes_change_the_output(vid):
    net = make(vid)
    x, t, _ = inputs(net)
    with torch.no_grad():
        a, b, null = (net(x, t, torch.full((2,), c)) for c in (0, 1, net.num_classes))
    assert relative_change(a, b) > 1e-2 and relative_change(a, null) > 1e-2


@pytest.mark.parametrize("vid", TIMED)
def test_time_changes_the_output_and_float_time_matches_index(vid):
    net = make(vid)
    x, _, y = inputs(net)
    with torch.no_grad():
        early = net(x, torch.full((2,), 3), y)
        late = net(x, torch.full((2,), net.T - 5), y)
        # Rectified-flow style: float t in [0, 1] is continuous time, the same point as index / T.
        frac = net(x, torch.full((2,), 3 / net.T), y)
        scalar = net(x, torch.tensor(3), y)
    assert relative_change(early, late) > 1e-2
    torch.testing.assert_close(frac, early, rtol=1e-4, atol=1e-5)
    assert torch.equal(scalar, early)
    with torch.no_grad():
        assert torch.isfinite(net(x, torch.rand(2), y)).all()


@pytest.mark.parametrize("vid", UNCOND)
def test_unconditional_net_refuses_labels(vid):
    net = make(vid)
    x, t, _ = inputs(net)
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("vid", [v for v in TIMED if BY_ID[v][0] != "noisy_classifier"])
def test_time_conditional_denoiser_needs_t(vid):
    net = make(vid)
    x, _, y = inputs(net)
    with pytest.raises(ValueError, match=rf"{net.arch} is time-conditional: pass t"):
        net(x, None, y)


def test_classifier_reads_missing_t_as_clean_and_ignores_y():
    net = make("noisy_classifier")
    x, _, _ = inputs(net)
    with torch.no_grad():
        clean = net(x, torch.zeros(2, dtype=torch.long))
        assert torch.equal(net(x), clean)
        assert torch.equal(net(x, None, torch.tensor([3, 4])), clean)


@pytest.mark.parametrize("vid", IDS)
def test_eval_is_deterministic_and_batch_independent(vid):
    net = make(vid)
    x, t, y = inputs(net, batch=2)
    with torch.no_grad():
        both = net(x, t, y)
        assert torch.equal(both, net(x, t, y))
        for i in range(2):
            yi = None if y is None else y[i:i + 1]
            torch.testing.assert_close(net(x[i:i + 1], t[i:i + 1], yi), both[i:i + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vid", IDS)
def test_channels_last_and_bf16_autocast(vid):
    net = make(vid)
    x, t, y = inputs(net)
    with torch.no_grad():
        ref = net(x, t, y)
        torch.testing.assert_close(net(x.to(memory_format=torch.channels_last), t, y), ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t, y)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().mean() < 0.1 * ref.abs().mean() + 1e-2


@pytest.mark.parametrize("arch", ["cs180_time_unet", "cs180_class_unet"])
def test_bf16_autocast_keeps_every_timestep_apart(arch):
    """t / T enters a Linear: in bf16 it would round to the same value for 23 neighbouring pairs of the
    300 timesteps (identical embeddings, so identical outputs). The time embedding runs in float32, also
    under compile: neighbouring timesteps get embeddings that differ by far more than rounding (in bf16
    those 23 pairs would differ by exactly 0)."""
    from ddpm.nets.cs180 import embed_time

    torch.manual_seed(0)
    net = build_net(arch, hidden=8, T=300).eval()
    frac = (torch.arange(300) / 300)[:, None]
    x = torch.randn(1, 1, 28, 28).expand(300, -1, -1, -1)
    y = torch.zeros(300, dtype=torch.long) if net.num_classes else None
    compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        emb = embed_time(net.t_embed1, frac).flatten(1)
        assert torch.equal(compiled(x, torch.arange(300), y), net(x, torch.arange(300), y))
    assert emb.dtype == torch.float32
    step = (emb[1:] - emb[:-1]).abs().amax(1) / emb.abs().amax()
    assert step.min() > 1e-4, f"timestep {step.argmin().item()} and the next embed almost alike ({step.min():.1e})"


# The three CS180 nets share one backbone, so the class-conditional one stands for all of them.
@pytest.mark.parametrize("vid", ["cs180_class_unet", "res_unet", "cifar_unet", "noisy_classifier"])
def test_traces_into_one_graph(vid):
    """torch.compile-friendly: no graph breaks (no .item(), no branching on tensor values)."""
    net = make(vid)
    x, t, y = inputs(net)
    compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), net(x, t, y))


def test_unknown_arch_lists_the_choices():
    with pytest.raises(UserError, match=r"unknown model.arch 'unet9'; choose one of: cifar_unet, cs180_class_unet, "):
        build_net("unet9")
    with pytest.raises(UserError, match="unet9"):
        net_kwargs("unet9")


def test_unknown_kwarg_is_named_with_the_accepted_ones():
    with pytest.raises(UserError, match=r"model.width .*res_unet.*accepted: T, channels, image_size"):
        build_net("res_unet", width=64)


@pytest.mark.parametrize("arch,kw,key", [
    ("cs180_class_unet", dict(hidden=0), "hidden"),
    ("cs180_class_unet", dict(num_classes=0), "num_classes"),
    ("cs180_time_unet", dict(T=-3), "T"),
    ("cs180_denoiser", dict(image_size=30), "image_size"),
    ("res_unet", dict(image_size=64), "image_size"),
    ("res_unet", dict(channels=True), "channels"),
    ("res_unet", dict(time_embedding="fourier"), "time_embedding"),
    ("cifar_unet", dict(image_size=28, in_channels=1), "ch_mult"),
    ("cifar_unet", dict(ch_mult="1,2,2"), "ch_mult"),
    ("cifar_unet", dict(attn_resolutions=[12]), "attn_resolutions"),
    ("cifar_unet", dict(num_groups=48), "num_groups"),
    ("cifar_unet", dict(dropout=1.5), "dropout"),
    ("cifar_unet", dict(num_classes=-1), "num_classes"),
    ("noisy_classifier", dict(num_classes=1), "num_classes"),
    ("noisy_classifier", dict(image_size=28, ch_mult=[1, 2, 2, 2]), "ch_mult"),
])
def test_invalid_values_raise_user_error(arch, kw, key):
    with pytest.raises(UserError, match=rf"^model\.{key}=.* is invalid for model.arch '{arch}': "):
        build_net(arch, **kw)


def test_net_kwargs_match_the_constructors():
    for name, cls in NETS.items():
        kw = net_kwargs(name)
        assert kw and "self" not in kw
        net = build_net(name, **{**kw, **SMALL[name]})  # every default is accepted as a value
        assert isinstance(net, cls)
    assert net_kwargs("cifar_unet")["ch_mult"] == (1, 2, 2, 2)
    assert net_kwargs("res_unet")["time_embedding"] == "sinusoidal"


def test_sequence_kwargs_accept_lists_and_tuples():
    small = dict(base=16, num_res_blocks=1, num_groups=8)
    a = build_net("cifar_unet", ch_mult=[1, 2], attn_resolutions=[16], **small)
    b = build_net("cifar_unet", ch_mult=(1, 2), attn_resolutions=(16,), **small)
    assert n_params(a) == n_params(b) and a.ch_mult == b.ch_mult == (1, 2)


def test_residual_blocks_are_variance_preserving():
    from ddpm.nets.res_unet import ResBlock

    blk = ResBlock(8, 8)
    with torch.no_grad():
        for p in blk.body.parameters():
            p.zero_()  # body output GELU(0) = 0, so the block is exactly x / √2
        x = torch.randn(2, 8, 7, 7)
        torch.testing.assert_close(blk(x), x / math.sqrt(2.0))
