"""tune: fine-tuning and personalization for latent diffusion (Stable Diffusion family) models."""

from pathlib import Path

__version__ = "0.1.0"

# The checkout holding `tune/`, where `models/`, `concepts/`, `recipes/configs/` and `eval/` ship.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
