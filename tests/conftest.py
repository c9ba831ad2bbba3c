from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.fixture
def golden_dir():
    """../shared/golden beside the checkout; tests skip with a reason when it is absent."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden fixtures folder not found ({GOLDEN.name} beside the checkout's parent)")
    return GOLDEN


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (small ops are faster so, and results do not depend on the core count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
