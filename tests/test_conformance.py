"""`armorstream conformance run`: the scenarios under tests/conformance pass on this kernel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from armorstream.conformance_cmd import ConformanceError, load_scenarios
from tests.conftest import need, need_root

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tests" / "conformance"


def conformance(*args: str) -> subprocess.CompletedProcess[str]:
    # Run as a child: the runner takes its own mount namespace. SIGKILL on timeout closes
    # its fanotify group, and the kernel then allows whatever was held.
    return subprocess.run(
        [sys.executable, "-m", "armorstream.cli", "conformance", "run", *args],
        capture_output=True, text=True, timeout=180, check=False, cwd=ROOT,
    )  # fmt: skip


def summary(out: str) -> tuple[int, int]:
    m = re.search(r"(\d+) passed, (\d+) failed", out)
    assert m, out
    return int(m[1]), int(m[2])


def test_scenarios_parse() -> None:
    scenarios = load_scenarios([SUITE])
    assert len(scenarios) >= 10
    ops = {s.alert.operation for sc in scenarios for s in sc.steps if s.alert}
    actions = {s.alert.action for sc in scenarios for s in sc.steps if s.alert}
    assert ops == {"Process", "File", "Network"} and actions == {"Block", "Audit"}
    names = ("process", "file", "network", "capabilities")
    kinds = {k for sc in scenarios for p in sc.policies for k in names if getattr(p, k)}
    assert kinds == {"process", "file", "network", "capabilities"}
    assert any(str(p.action) == "Allow" for sc in scenarios for p in sc.policies)


def test_bad_step_file_is_a_named_error(tmp_path: Path) -> None:
    (tmp_path / "cmd1").write_text("source: x\ncmd: true\nresult: maybe\n")
    with pytest.raises(ConformanceError, match="cmd1: result must be passed or failed"):
        load_scenarios([tmp_path])


@pytest.mark.root
@pytest.mark.kernel
def test_suite_passes_on_this_kernel() -> None:
    need_root()
    need((ROOT / "bpf/.output/netblock.bpf.o").exists(), "bpf objects not built (make -C bpf)")
    need(shutil.which("unshare") and os.path.exists("/usr/bin/python3"), "needs unshare and /usr/bin/python3")
    r = conformance(str(SUITE))
    steps = sum(len(sc.steps) for sc in load_scenarios([SUITE]))
    assert summary(r.stdout) == (steps, 0), r.stdout + r.stderr
    assert r.returncode == 0
    assert len(re.findall(r"^PASS ", r.stdout, re.M)) == steps


@pytest.mark.root
@pytest.mark.kernel
def test_wrong_expectation_fails(tmp_path: Path) -> None:
    need_root()
    need((ROOT / "bpf/.output/netblock.bpf.o").exists(), "bpf objects not built (make -C bpf)")
    sc = tmp_path / "wrong"
    shutil.copytree(SUITE / "file-path-block", sc)
    shutil.copy(SUITE / "workloads.yaml", tmp_path / "workloads.yaml")
    # The file is blocked, so claiming it passes (with an Audit alert) must fail twice over.
    (sc / "cmd1").write_text(
        "source: ubuntu-1-deployment\ncmd: cat /etc/hostname\nresult: passed\n---\n"
        "operation: File\ncondition: /etc/hostname\naction: Audit\n"
    )
    r = conformance(str(sc))
    assert r.returncode == 1 and summary(r.stdout) == (1, 1), r.stdout + r.stderr
    fail = next(line for line in r.stdout.splitlines() if line.startswith("FAIL"))
    assert "command failed" in fail and "no Audit alert" in fail and "saw: File /etc/hostname Block" in fail
