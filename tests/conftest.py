import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The real her2st files live beside the checkout (../shared/data/her2st); tests that need them skip
# cleanly when they are absent.
HER2ST = REPO.parent / "shared" / "data" / "her2st"


@pytest.fixture
def her2st_root():
    if not (HER2ST / "ST-cnts").is_dir():
        pytest.skip(f"real her2st data not found at {HER2ST}")
    return HER2ST
