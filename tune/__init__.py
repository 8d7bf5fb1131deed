"""tune: fine-tuning and personalization for latent diffusion (Stable Diffusion family) models."""

__version__ = "0.1.0"
