"""Shared test setup: one intra-op thread, so tests run beside long training jobs."""

import torch

torch.set_num_threads(1)
