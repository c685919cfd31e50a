import pytest

from tests.launch import KITS19, UCI_CKD


@pytest.fixture(scope="session")
def kits19_dir():
    if not (KITS19 / "kits.json").exists():
        pytest.skip("../shared/data/kits19 is not beside this checkout")
    return KITS19


@pytest.fixture(scope="session")
def uci_ckd_dir():
    if not UCI_CKD.exists():
        pytest.skip("../shared/data/uci_ckd is not beside this checkout")
    return UCI_CKD
