"""Shared test set-up. Without a GPU, Triton's interpreter runs the kernels; it must be on
before anything imports triton (with a GPU the real kernels run)."""

import os
import shutil
import subprocess


def _has_cuda() -> bool:
    # without importing torch first (torch may import triton)
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No test reaches the network: a Hub id resolves from the local cache or stops with an error
# (huggingface_hub reads this once, at its import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("default", deadline=None, print_blob=True)
settings.register_profile("thorough", deadline=None, print_blob=True, max_examples=200)
settings.register_profile("gpu", deadline=None, print_blob=True, max_examples=30)  # the timed GPU check
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Each test folder is a part of the project, and a marker of the same name selects it:
# `pytest -m kernels`, `pytest -m "train and not slow"`. `slow` marks the tests that launch processes,
# train whole runs or sweep the model zoo: `pytest -m "not slow"` is the quick subset.
PARTS = ("kernels", "models", "train", "integrations", "study", "project")


def pytest_collection_modifyitems(config, items):
    for item in items:
        part = item.path.parent.name
        if part in PARTS:
            item.add_marker(getattr(pytest.mark, part))
