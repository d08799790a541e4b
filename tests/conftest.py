import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton's CPU interpreter for the flash-attention kernel tests: the flag is read when
    # @triton.jit decorates a kernel, so it is set before any test module is collected (one
    # that imports a library importing triton, peft for one, would otherwise come first)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite tests/goldens/*.txt from the current output")


@pytest.fixture
def update_goldens(request):
    return request.config.getoption("--update-goldens") or os.environ.get("EXPECTTEST_ACCEPT") == "1"
