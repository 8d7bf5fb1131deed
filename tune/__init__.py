"""tune: fine-tuning and personalization for latent diffusion (Stable Diffusion family) models."""

from tune.paths import DATA_ROOT

__version__ = "0.1.0"

# The folder holding models/, concepts/, recipes/configs/, eval/ and dashboard/: the clone, or an installed
# wheel's copy of them (see tune/paths.py; look a user's path up with tune.paths.find_path).
PROJECT_ROOT = DATA_ROOT
