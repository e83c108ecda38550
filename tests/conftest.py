import os
from pathlib import Path

import pytest

# Real frames shared by the project (read-only); tests copy them into tmp dirs.
FIXTURES = Path(os.environ.get("CURRICULUM_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES} (set CURRICULUM_FIXTURES)")
    return FIXTURES
