"""ddpm-hpc: denoising diffusion models for MNIST and CIFAR-10 on SLURM GPU clusters."""

__version__ = "0.1.0"
