"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# One XLA compilation cache for the whole run, shared by this process, pytest-xdist's workers and
# every process the tests start (CLI dumps, notebook kernels, multi-process runs), which compile
# the same programs again and again; made empty for each run and removed after it.
_RUN_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _RUN_COMPILATION_CACHE = tempfile.mkdtemp(prefix="grokscope-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_COMPILATION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    if _RUN_COMPILATION_CACHE is not None:
        shutil.rmtree(_RUN_COMPILATION_CACHE, ignore_errors=True)

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
def grok2_fixture_dir() -> Path:
    """The tiny Grok-2 in the release's layout, with sglang-jax and float64 reference outputs."""
    return _shared_path("fixtures", "grok2-tiny")


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_config, tiny_params):
    """A random TINY model in the release's layout, with config.json and a 512-piece tokenizer."""
    import dataclasses
    import json
    import sysconfig

    import sentencepiece as spm

    from grokscope import save_params

    directory = tmp_path_factory.mktemp("tiny-model")
    save_params(tiny_params, directory, tiny_config)
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(tiny_config)))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / name).read_text() for name in ("textwrap.py", "string.py", "this.py"))
    sentences = [line for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(directory / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        num_threads=1, minloglevel=2)
    return directory


@pytest.fixture(scope="session")
def bundled_session():
    """One Session of the bundled grok-tiny for the whole run (tests must not change it)."""
    from grokscope import Session

    return Session()


@pytest.fixture
def playwright():
    """playwright driving Debian's Chromium (tests/browser.py); without either the test skips
    locally and fails in CI (where CI is set)."""
    import browser

    if not Path(browser.CHROMIUM).exists():
        message = f"{browser.CHROMIUM} is missing: the browser tests need Debian's Chromium (apt install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("playwright is not installed (pip install -e .[dev])")
        pytest.skip("playwright is not installed (pip install -e .[dev])")
    with sync_playwright() as pw:
        yield pw


@pytest.fixture
def forget_compiled():
    """Empties the per-config caches of jitted programs (before, after, and when called), so that
    a test that changes a module constant read while tracing gets programs traced with it."""
    import importlib

    forward, runner = (importlib.import_module(f"grokscope.{name}") for name in ("forward", "runner"))

    def forget():
        for cached in (forward.jitted_forward, forward.jitted_decoder, runner._program):
            cached.cache_clear()

    forget()
    yield forget
    forget()
