"""Shared fixtures. Tiers: default (fast), `model`, `browser`, `slow` — CI runs all of them."""
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "data" / "goldens.json"  # copy of ../shared/reference/goldens.json


@pytest.fixture(scope="session")
def goldens():
    """Golden matrices from the authors' code (../shared/reference/goldens.json)."""
    return json.loads(GOLDENS.read_text())


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model, loaded once per test session."""
    from maskstudio.runner import load_model

    return load_model()
