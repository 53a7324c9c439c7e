"""Fast repeated net evaluation for sampling on CUDA: bf16 autocast, torch.compile, CUDA graphs.

The samplers in :mod:`ddpm.sampling` call ``eps_model(x, t, y)`` once per step and take their per-step
scalars from the host as Python floats, so the eps model (the net, with the classifier-free-guidance
wrapper around it) is the only device work in the loop. At sampling batch sizes (100 MNIST images, 64
CIFAR images) a step is a few hundred small kernels, so launch overhead rather than arithmetic bounds
it: compiling fuses the elementwise work and CUDA graphs replay the whole step with one launch.
On the CPU everything here is a no-op, so CPU sampling is unchanged.
"""
import torch

from ddpm.compile_cache import use_persistent_cache


def compile_for_sampling(eps_model, device, *, bf16: bool = True, compile: bool = True, cuda_graphs: bool = True):
    """Wrap ``eps_model(x, t, y)`` (a net or a guidance wrapper) for fast repeated calls on CUDA.

    Returns a callable with the same signature: x (B, C, H, W) float32, t LongTensor (B,), y LongTensor
    (B,) or None → float32 (B, C, H, W). On a non-CUDA device, or with bf16 and compile both off, it
    returns ``eps_model`` itself.

    - bf16: run under bfloat16 autocast (the output is cast back to float32 for the sampler's update).
    - compile: ``torch.compile`` with static shapes; the first call for each batch shape compiles
      (tens of seconds for the CIFAR UNet), later ones reuse it.
    - cuda_graphs (only with compile): ``mode="reduce-overhead"`` records the compiled call in a CUDA graph
      and replays it. The output is cloned out of the graph's static buffer, so callers may keep it
      across calls.

    Call it once per model and reuse the result: every wrapper compiles the same function, which dynamo
    specialises on the wrapped model (and a guidance wrapper's scale); past its recompile limit (8) it
    silently runs eagerly. A caller looping over guidance scales or checkpoints must keep the scale
    outside the compiled region or reset dynamo between variants.
    """
    if torch.device(device).type != "cuda" or not (bf16 or compile):
        return eps_model

    def run(x, t, y):
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            return eps_model(x, t, y).float()

    if not compile:
        return run
    use_persistent_cache()
    compiled = torch.compile(run, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
    if not cuda_graphs:
        return compiled

    def replay(x, t, y):
        # Every call starts a new graph "generation": the previous output buffer may be reused.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, t, y).clone()

    return replay
