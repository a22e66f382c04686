"""Shared test setup: one intra-op thread, and one smoke run of the workflow per session."""

import pytest
import torch

from workflow_helpers import run_smoke

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One run of the whole smoke workflow, shared by every test that inspects its outputs."""
    return run_smoke(tmp_path_factory.mktemp("smoke"))
