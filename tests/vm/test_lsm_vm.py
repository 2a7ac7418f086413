"""BPF-LSM enforcement in a qemu guest kernel with the bpf LSM on (this VM refuses trampolines).

One guest boot runs tests/vm/lsm_guest.py; each test below checks one kind of operation:
the blocked attempt fails with EPERM and leaves a Block record, the neighbouring allowed
one passes.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from enforcer.records import Flag
from tests.conftest import need, need_root
from tests.vm import harness

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[2]
EPERM = f"errno {errno.EPERM}"


@pytest.fixture(scope="module")
def guest() -> dict[str, Any]:
    need_root()
    need(harness.missing() is None, f"qemu guest: {harness.missing()}")
    need((ROOT / "bpf/.output/lsm.bpf.o").exists(), "bpf/.output/lsm.bpf.o not built (make -C bpf)")
    r = harness.run(".venv/bin/python -m tests.vm.lsm_guest", str(ROOT), timeout=400)
    assert "bpf" in r.lsm.split(","), f"bpf LSM not active in the guest: {r.lsm!r}"
    lines = [ln for ln in r.output.splitlines() if ln.startswith("AS-RESULT ")]
    assert lines, f"guest produced no result (rc {r.rc}):\n{r.console[-4000:]}"
    return json.loads(lines[-1].removeprefix("AS-RESULT "))  # type: ignore[no-any-return]


def blocked_records(guest: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    recs = [r for r in guest["records"] if r["kind"] == kind and r["flags"] & Flag.BLOCKED and r["cgroup"]]
    assert all(r["flags"] & Flag.ENF_BPFLSM for r in recs)  # the alert's Enforcer is BPFLSM
    return recs


def test_exec(guest: dict[str, Any]) -> None:
    res = guest["results"]
    assert res["exec_blocked"] == EPERM
    assert res["exec_allowed"] == "ok"
    assert guest["exec_after_remove"] == "ok"
    assert [r["path"] for r in blocked_records(guest, "EXEC")] == ["/tmp/blocked"]


def test_file(guest: dict[str, Any]) -> None:
    res = guest["results"]
    assert res["open_secret"] == EPERM and res["open_public"] == "ok"
    assert res["ro_read"] == "ok" and res["ro_write"] == EPERM
    assert res["dir_recursive"] == EPERM
    assert res["from_source_cat"].startswith("rc ") and res["from_source_python"] == "ok"
    paths = sorted(r["path"] for r in blocked_records(guest, "FILE"))
    assert paths == ["/tmp/fs", "/tmp/private/a/b", "/tmp/ro", "/tmp/secret"]


def test_network(guest: dict[str, Any]) -> None:
    res = guest["results"]
    for op in ("raw_socket", "tcp_socket", "connect", "bind", "listen", "accept"):
        assert res[op] == EPERM, (op, res[op])
    assert res["udp_socket"] == "ok"
    ops = sorted({r["op"] for r in blocked_records(guest, "NET")})
    assert ops == [1, 2, 3, 4, 5]  # socket, connect, bind, listen, accept


def test_capabilities(guest: dict[str, Any]) -> None:
    assert guest["results"]["chown"] == EPERM
    assert 0 in [r["cap"] for r in blocked_records(guest, "CAP")]  # CAP_CHOWN


def test_random_policies_agree_with_the_model(guest: dict[str, Any]) -> None:
    """Random file/process rules: the LSM's answers equal compiler.lookup_open/lookup_exec."""
    d = guest["differential"]
    assert d["checked"] >= 400
    assert d["n_bad"] == 0, d["disagreements"]
