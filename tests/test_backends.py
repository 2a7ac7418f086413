"""Backend selection: which enforcer each operation kind gets, and the alert's Enforcer name."""

from __future__ import annotations

import pytest

from enforcer.backends import Backend, Probe, select
from tests.conftest import need_root


def test_bpf_lsm_takes_everything_when_it_loads() -> None:
    s = select(Probe(lsm_active=True, lsm_loads=True, cgroup_loads=True, fanotify=True))
    assert {s.process, s.file, s.network, s.capabilities} == {Backend.BPFLSM}
    assert s.enforcer("Process") == "BPFLSM" and s.uses_lsm


def test_without_trampolines_fanotify_and_cgroup_bpf() -> None:
    s = select(Probe(lsm_active=True, lsm_loads=False, cgroup_loads=True, fanotify=True))
    assert (s.process, s.file, s.network, s.capabilities) == (
        Backend.FANOTIFY, Backend.FANOTIFY, Backend.CGROUP, Backend.CGROUP,
    )  # fmt: skip
    assert s.enforcer("File") == "Fanotify" and s.enforcer("Network") == "CgroupBPF"
    assert any("trampolines" in n for n in s.notes) and any("net_raw" in n for n in s.notes)


def test_nothing_available_is_audit_only_and_says_why() -> None:
    s = select(Probe())
    assert s.enforcer("Process") == "" and s.enforcer("Network") == ""
    assert any("lsm=" in n for n in s.notes) and any("audit only" in n for n in s.notes)


@pytest.mark.root
@pytest.mark.kernel
def test_probe_this_kernel() -> None:
    need_root()
    from sensor.enforce import probe

    p = probe()
    s = select(p)
    # Whatever this kernel is, every kind gets a backend or a reason.
    assert s.enforcer("Process") in ("BPFLSM", "Fanotify", "")
    if not p.lsm_loads:
        assert s.notes
