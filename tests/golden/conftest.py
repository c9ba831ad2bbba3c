"""Golden tests read the fixture set named by NEODRAGON_GOLDEN_DIR, else ../shared/golden beside the
checkout, and skip (with the reason) only when that folder is absent."""

import pytest
from golden_case import golden_root, missing_reason


@pytest.fixture
def golden_dir():
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    return golden_root()
