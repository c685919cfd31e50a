"""requirements.lock: make setup installs it, and the environment the tests run in is the locked one."""
from __future__ import annotations

import re
import tomllib

import pytest

from tests import lock


def test_the_lock_pins_every_dependency_of_the_package():
    pins = lock.locked()
    project = tomllib.loads((lock.REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["test"] + extras["bench"]
    names = {lock.canonical(re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0]) for r in wanted} | {"torch", "horovod"}
    assert not names - pins.keys(), f"requirements.lock lacks {sorted(names - pins.keys())}: run make lock"
    assert all(re.fullmatch(r"\d+(\.\d+)*([a-z]+\d*)?(\.post\d+)?", v) for v in pins.values()), pins


def test_the_lock_satisfies_the_lower_bounds_of_pyproject():
    pins = lock.locked()
    project = tomllib.loads((lock.REPO / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([\d.]+)", req)
        assert m, f"pyproject.toml: {req!r} is not name>=version"
        have = tuple(int(p) for p in pins[lock.canonical(m.group(1))].split(".")[:3] if p.isdigit())
        want = tuple(int(p) for p in m.group(2).split("."))
        assert have >= want, f"requirements.lock's {m.group(1)} {have} is below pyproject's bound {want}"


def test_installed_versions_are_the_locked_ones():
    """In an environment that make setup installed from this lock, every package is at its locked version."""
    if not lock.installed_from_lock():
        pytest.skip(f"this environment was not installed from requirements.lock by make setup: {lock.note()}")
    diff = lock.differences()
    assert not diff, lock.note()


def test_a_bad_lock_line_is_named(tmp_path):
    bad = tmp_path / "requirements.lock"
    bad.write_text("# comment\nnumpy==2.4.6\nscipy>=1.10\n")
    with pytest.raises(ValueError, match=r"requirements.lock:3: not a name==version line: 'scipy>=1.10'"):
        lock.locked(bad)


def test_differences_name_the_package_and_both_versions(tmp_path):
    fake = tmp_path / "requirements.lock"
    fake.write_text(f"numpy=={lock.installed_version('numpy')}\npytest==0.0.1\nno-such-package==1.0\n")
    assert lock.differences(fake) == {"pytest": ("0.0.1", lock.installed_version("pytest")),
                                      "no-such-package": ("1.0", None)}
    text = lock.note(fake)
    assert "pytest " + lock.installed_version("pytest") + " (locked 0.0.1)" in text
    assert "no-such-package missing (locked 1.0)" in text and "numpy" not in text
