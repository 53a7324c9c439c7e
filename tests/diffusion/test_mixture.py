"""The conjunction of composable diffusion (ddpm.diffusion.mixture) on the closed-form Gaussian class models of
test_samplers: the composed eps is the weighted combination of the exact class and mixture eps, from one
batched forward of (1 + K) B samples; one class at weight gamma is classifier-free guidance."""
import pytest
import torch

from ddpm.diffusion import samplers as S
from ddpm.diffusion.mixture import composed_guidance
from ddpm.errors import UserError

from test_samplers import MU, SCHED, gaussian_eps, gen, mixture_eps

K = len(MU)


def exact_model(calls=None):
    """eps(x_t, t, y) of 1-D Gaussian classes N(MU[y], SD^2); y = K (the null class): the uniform mixture's."""
    cond = gaussian_eps(MU)

    def model(x, t, y):
        if calls is not None:
            calls.append((x.shape[0], y.tolist()))
        null = y == K
        out = cond(x, t, y.clamp(max=K - 1))
        return torch.where(null.view(-1, 1, 1, 1), mixture_eps(x, t), out)
    return model


def batch(n=6, seed=3):
    g = gen(seed)
    return torch.randn(n, 1, 1, 1, generator=g) * 2, torch.randint(0, 1000, (n,), generator=g)


def test_composed_eps_is_the_weighted_combination_from_one_batched_forward():
    x, t = batch()
    calls = []
    composed = composed_guidance(exact_model(calls), [0, 2], [0.7, 2.5], num_classes=K)
    got = composed(x, t, None)
    eps_u = mixture_eps(x, t)
    want = eps_u + 0.7 * (gaussian_eps(MU)(x, t, torch.zeros(6, dtype=torch.long)) - eps_u) \
        + 2.5 * (gaussian_eps(MU)(x, t, torch.full((6,), 2)) - eps_u)
    assert torch.allclose(got, want, atol=1e-6)
    assert (want - eps_u).abs().max() > 0.1  # the guidance term is far from float noise
    assert calls == [(3 * 6, [0] * 6 + [2] * 6 + [K] * 6)]  # one forward of (1 + K) B: c_1, c_2, null


def test_one_class_is_classifier_free_guidance_and_labels_are_ignored():
    x, t = batch(seed=4)
    model = exact_model()
    composed = composed_guidance(model, [1], [5.0], num_classes=K)
    cfg = S.classifier_free_guidance(model, 5.0, "gamma", num_classes=K)
    y = torch.full((6,), 1)
    assert torch.allclose(composed(x, t, None), cfg(x, t, y), atol=1e-6)
    assert torch.equal(composed(x, t, torch.zeros(6, dtype=torch.long)), composed(x, t, None))
    # weights that sum to zero around one class: the unconditional prediction
    assert torch.allclose(composed_guidance(model, [0, 2], [0.0, 0.0], K)(x, t, None), mixture_eps(x, t), atol=1e-7)


def test_sampling_the_conjunction_of_one_class_reproduces_it():
    """Every sampler takes it: DDIM with the composition of class 2 alone at weight 1 draws class 2's Gaussian."""
    composed = composed_guidance(exact_model(), [2], [1.0], num_classes=K)
    xs = S.sample_ddim(composed, torch.randn(4000, 1, 1, 1, generator=gen(12)), S.ddim_timesteps(1000, 100), None,
                       schedule=SCHED)
    assert xs.mean().item() == pytest.approx(MU[2].item(), abs=0.03)


@pytest.mark.parametrize("classes,weights,num_classes,match", [
    ([0, 1], [1.0], K, "one weight per class"),
    ([], [], K, "one weight per class"),
    ([0, 3], [1.0, 1.0], K, r"in \[0, 3\)"),
    ([0, 1], [1.0, float("nan")], K, "finite weights"),
    ([0, 1], [1.0, 1.0], 0, "class-conditional model"),
])
def test_bad_mixtures(classes, weights, num_classes, match):
    with pytest.raises(UserError, match=match):
        composed_guidance(exact_model(), classes, weights, num_classes)
