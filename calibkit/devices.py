"""Where a model lives: the one helper every floor uses to put its batches on the model's device."""

import torch

__all__ = ["model_device"]


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the first parameter or buffer of ``model`` (CPU if it has none)."""
    return next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
