"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GROKSCOPE_SHARED", REPO.parent / "shared"))


def _shared_path(*parts) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run the reference checks (set GROKSCOPE_SHARED)")
        pytest.skip(f"{path} is absent (the reference fixtures live beside the repository in ../shared)")
    return path


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The official tiny reference checkpoint ../shared/fixtures/grok1-tiny."""
    return _shared_path("fixtures", "grok1-tiny")


@pytest.fixture(scope="session")
def grok1_tokenizer_file() -> Path:
    return _shared_path("grok-1", "tokenizer.model")


@pytest.fixture(scope="session")
def fixture_config(fixture_dir):
    import json

    from grokscope import ModelConfig

    official = json.loads((fixture_dir / "config.json").read_text())["language_model_config"]
    return ModelConfig.from_official(official)


@pytest.fixture(scope="session")
def tiny_config():
    from grokscope import TINY

    return TINY


@pytest.fixture(scope="session")
def tiny_params(tiny_config):
    from grokscope import init_params

    return init_params(tiny_config, seed=1)
