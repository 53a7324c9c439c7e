"""Nets: the denoising nets and the noisy classifier, chosen by name (``model.arch``) from a registry.

Public surface (import from the modules): ``ddpm.nets.registry`` (``NETS``, ``register``, ``build_net``,
``net_kwargs``) and ``ddpm.nets.loading`` (checkpoint state dicts: ``clean_state_dict``, ``unwrap_model``,
``load_weights``). Builds on ``ddpm.errors`` only. This file imports every net module (``cs180``,
``res_unet``, ``cifar_unet``, ``noisy_classifier``; ``layers`` holds their shared pieces), so that each
registers its nets before anything is looked up.

Every net: ``forward(x, t=None, y=None)`` with
- ``x``: (B, C, H, W) float;
- ``t``: LongTensor (B,) of timestep indices in [0, T) (normalised to t / T inside), or a float tensor
  (B,) of continuous time in [0, 1] used as-is (rectified flow);
- ``y``: LongTensor (B,) class labels in [0, num_classes]; ``num_classes`` is the learned null class
  (classifier-free guidance) and ``y=None`` is the same as passing it everywhere.
Returns (B, C, H, W) (the classifier returns logits (B, num_classes)). Attributes: ``num_classes``
(0 = unconditional; such a net raises ValueError when given y), ``time_conditional``, ``in_channels``,
``image_size``, ``arch`` (the registry name). Time-conditional denoisers need t (ValueError without).
``noisy_classifier`` is the exception: ``num_classes`` counts its logits, y is ignored, t=None = clean.

Sizes at the defaults (trainable parameters; tests/nets/test_nets.py pins them):
- cs180_denoiser    hidden=128, MNIST                       7,891,073
- cs180_time_unet   hidden=64,  MNIST                       1,996,417
- cs180_class_unet  hidden=64,  MNIST, 10 classes           2,019,393  (course figure ≈2.1 M)
- res_unet          channels=32, MNIST, 10 classes            712,289  (64: 2,837,697; 128: 11,327,873)
- cifar_unet        DDPM-CIFAR10 config, num_classes=0     35,746,307  (DDPM paper: 35.7 M)
- cifar_unet        defaults (num_classes=10)              35,751,939
- noisy_classifier  base=32, MNIST                            426,602
"""
from ddpm.nets import cifar_unet, cs180, noisy_classifier, res_unet  # noqa: F401  (each registers its nets)
