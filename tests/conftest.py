"""Shared fixtures. Real components only: the tansu broker, chdb, the running kernel.

`need(ok, reason)`: on a developer machine a missing facility skips the test with
its reason; under CI=true it fails, because .ci/run installs and starts everything.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT.parent / "shared" / "kubearmor-examples"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(ok: object, reason: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI=true and a required facility is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    need(path, f"needs {name} on PATH")
    assert path is not None
    return path


def need_cgroup2() -> Path:
    """The cgroup v2 mount, found the way the sensor finds it."""
    from sensor.identity import IdentityError, cgroup2_mount

    try:
        return cgroup2_mount()
    except IdentityError as e:
        need(False, str(e))
        raise


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    need(EXAMPLES.is_dir(), f"KubeArmor examples not found at {EXAMPLES}")
    return EXAMPLES


@pytest.fixture
def broker() -> Iterator[object]:
    """A fresh tansu broker on a free loopback port, stopped afterwards."""
    from armorstream.embedded_broker import BrokerError, TansuBroker

    try:
        b = TansuBroker().start()
    except BrokerError as e:
        need(False, str(e))
        raise
    try:
        yield b
    finally:
        b.stop()
