"""Shared fixtures: the ../shared photo set and seed model, the embedded classifier, image files.

``SHARED`` is the sibling folder of the repository (never copied into it).
Tests that need it carry ``@pytest.mark.needs_shared`` or use the ``shared``
fixture; both skip with one clear reason when it is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow
# BIKEWATCH_* variables are settings (config.load_settings reads them, and so does every daemon a
# test starts): the suite must not take the caller's own settings. Tests that want one set it.
for _name in [n for n in os.environ if n.startswith("BIKEWATCH_")]:
    del os.environ[_name]

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SHARED = REPO_ROOT.parent / "shared"
SHARED_BIKES = SHARED / "data" / "bikes"
SEED_MODEL = SHARED / "models" / "seed-notebook.h5"
SHARED_REASON = "../shared is absent: the shared photo set and seed model are needed"

if str(TESTS_DIR) not in sys.path:  # `import imagefactory` from any test module, any import mode
    sys.path.insert(0, str(TESTS_DIR))


def shared_available() -> bool:
    return SHARED_BIKES.is_dir() and SEED_MODEL.is_file()


needs_shared = pytest.mark.needs_shared
"""Marker: skip unless ../shared holds data/bikes and models/seed-notebook.h5."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"needs_shared: skipped when {SHARED_REASON}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_shared") and not shared_available():
        pytest.skip(SHARED_REASON)


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared folder (``SHARED``); skips the test when it is absent."""
    if not shared_available():
        pytest.skip(SHARED_REASON)
    return SHARED


@pytest.fixture(scope="session")
def default_classifier():
    """The embedded default model, loaded once per test session."""
    from bikewatch.inference.model import load_classifier

    return load_classifier()


@pytest.fixture(scope="session")
def seed_classifier(shared: Path):
    """The seed notebook's HDF5 model, loaded once per test session (needs ../shared)."""
    from bikewatch.inference.model import load_classifier

    return load_classifier(SEED_MODEL)


@pytest.fixture(scope="session")
def shared_test_photos(shared: Path) -> list[tuple[Path, str]]:
    """(path, true class) for every photo under ../shared/data/bikes/test, sorted (needs ../shared)."""
    out: list[tuple[Path, str]] = []
    for label in ("mountain", "road"):
        out += [(p, label) for p in sorted((SHARED_BIKES / "test" / label).glob("*.jpg"))]
    return out


@pytest.fixture
def daemons():
    """Daemons (``harness.Daemon``) started by a test; whatever is still running at teardown is killed."""
    started: list = []
    yield started
    for d in started:
        d.stop_quietly()


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    """A test that calls bikewatch.logs.configure() in process (its level, its stream) must not
    change what later tests log or capture: structlog's configuration, the root logger's handlers
    and level, and warnings capture are put back after every test."""
    import logging

    import structlog

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``tmpfs(name, size)`` mounts a fresh tmpfs at tmp_path/name; skips when mounting is not allowed."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir(exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {res.stderr.strip() or res.returncode}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
