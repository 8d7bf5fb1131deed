"""kohya's LoRA merge math (LoRAInfModule.merge_to), written independently of tune.lora: what the LoRA
tests compare tune's merges and exports against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expected_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """The weight change of one module: up @ down (as a convolution for 3x3 kernels) times alpha / rank."""
    down, up, rank = down.float(), up.float(), down.shape[0]
    if down.ndim == 2:
        product = up @ down
    elif down.shape[2:] == (1, 1):
        product = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    else:
        product = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return product * (alpha / rank)
