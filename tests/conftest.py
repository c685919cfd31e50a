import os

import pytest

from tests.launch import KITS19, UCI_CKD


def missing_shared(msg: str) -> None:
    """Data from ../shared is absent: skip on a developer's machine, fail under CI (which must provide it)."""
    if os.environ.get("CI"):
        pytest.fail(msg + ": CI must provide ../shared")
    pytest.skip(msg)


def _need(path, what):
    if not path.exists():
        missing_shared(f"{what} ({path}) is not beside this checkout")
    return path


@pytest.fixture(scope="session")
def kits19_dir():
    return _need(KITS19 / "kits.json", "../shared/data/kits19").parent


@pytest.fixture(scope="session")
def uci_ckd_dir():
    return _need(UCI_CKD, "../shared/data/uci_ckd")


def pytest_report_header(config):
    from tests import lock
    return lock.note()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``horovod`` are skipped, with the reason, where Horovod is not installed (ENGINE=torch set-up)."""
    from tests.launch import horovod_missing
    reason = horovod_missing()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("horovod") is not None:   # not item.keywords: a parameter id may say horovod
            item.add_marker(pytest.mark.skip(reason=reason))
