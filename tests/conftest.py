import os

import pytest

from tests.launch import KITS19, UCI_CKD


def _need(path, what):
    if not path.exists():
        msg = f"{what} ({path}) is not beside this checkout"
        if os.environ.get("CI"):
            pytest.fail(msg + ": CI must provide ../shared")
        pytest.skip(msg)
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
