"""The device that training and feature extraction run on."""

import torch


def default_device() -> torch.device:
    """Return the first CUDA device when one is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
