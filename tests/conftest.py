from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.fixture
def golden_dir():
    """../shared/golden beside the checkout; tests skip with a reason when it is absent."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden fixtures folder not found ({GOLDEN.name} beside the checkout's parent)")
    return GOLDEN
