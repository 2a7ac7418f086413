"""fanotify permission backend against the real kernel: a process in a test cgroup is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from enforcer.compiler import Decision, compile_workload
from enforcer.fanotify import (
    CGROUP2_ROOT,
    Access,
    CompiledDecider,
    FanotifyEnforcer,
    fanotify_available,
)
from enforcer.policy.model import (
    Action,
    FileRule,
    Policy,
    PolicyKind,
    ProcessRule,
    RuleMeta,
    Selector,
    Target,
)
from enforcer.workload import DefaultPosture, Posture
from tests.conftest import need, need_root

pytestmark = [pytest.mark.root, pytest.mark.kernel]


@dataclass
class Box:
    mnt: Path
    cgroup: Path
    cgroup_id: int

    def run(self, *argv: str, in_cgroup: bool = True) -> subprocess.CompletedProcess[str]:
        # /bin/sh lives outside the marked mount: only `argv` is judged.
        procs = self.cgroup / "cgroup.procs" if in_cgroup else Path(CGROUP2_ROOT) / "cgroup.procs"
        script = f'echo $$ > {procs} && exec "$@"'
        return subprocess.run(
            ["/bin/sh", "-c", script, "sh", *argv], capture_output=True, text=True, timeout=10, check=False
        )


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    need_root()
    need(fanotify_available() is None, f"fanotify permission events: {fanotify_available()}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # A mount of our own, so the marks never see the rest of this shared machine.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "astest", str(mnt)], check=True)
    cg = Path(CGROUP2_ROOT) / f"armorstream-fan-{os.getpid()}"
    cg.mkdir()
    try:
        for name in ("blocked", "allowed", "audited"):
            shutil.copy2("/bin/true", mnt / name)
        (mnt / "secret.txt").write_text("s\n")
        (mnt / "public.txt").write_text("p\n")
        yield Box(mnt, cg, cg.stat().st_ino)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                os.sched_yield()


def denied(r: subprocess.CompletedProcess[str]) -> bool:
    # FAN_DENY gives EPERM, as a BPF-LSM denial does; KubeArmor's Result says "Permission denied".
    return r.returncode != 0 and "Operation not permitted" in r.stderr


def meta(action: Action) -> RuleMeta:
    return RuleMeta(action, 5, ("test",), f"{action} by test")


def start(box: Box, posture: DefaultPosture | None = None, *extra: Policy) -> tuple[FanotifyEnforcer, list]:
    m = str(box.mnt)
    pol = Policy(
        PolicyKind.KSP,
        "fan-test",
        "ns",
        Selector(),
        None,
        5,
        process=(
            ProcessRule(Target.PATH, f"{m}/blocked", meta(Action.BLOCK)),
            ProcessRule(Target.PATH, f"{m}/audited", meta(Action.AUDIT)),
        ),
        file=(FileRule(Target.PATH, f"{m}/secret.txt", meta(Action.BLOCK)),),
    )
    cs = compile_workload([pol, *extra], box.cgroup_id, posture)
    decider = CompiledDecider({box.cgroup_id: cs})
    seen: list[tuple[Access, dict[str, object]]] = []
    fan = FanotifyEnforcer(decider, lambda a, d: seen.append((a, a.log(d))), [m], static=decider.static)
    return fan.start(), seen


def test_exec_blocked_in_cgroup_allowed_elsewhere(box: Box) -> None:
    fan, seen = start(box)
    try:
        r = box.run(str(box.mnt / "blocked"))
        assert denied(r), r
        assert box.run(str(box.mnt / "allowed")).returncode == 0
        assert box.run(str(box.mnt / "audited")).returncode == 0
        assert box.run(str(box.mnt / "blocked"), in_cgroup=False).returncode == 0  # other workload
    finally:
        fan.stop()
    blocked = [log for a, log in seen if log["Action"] == "Block"]
    assert len(blocked) == 1, seen
    log = blocked[0]
    assert log["Result"] == "Permission denied" and log["PolicyName"] == "fan-test"
    assert log["Operation"] == "Process" and log["Resource"] == str(box.mnt / "blocked")
    assert log["Severity"] == "5" and log["Enforcer"] == "Fanotify" and log["Type"] == "MatchedPolicy"
    assert log["ParentProcessName"] == "/usr/bin/dash" or str(log["ParentProcessName"]).endswith("sh")
    audited = [log for a, log in seen if log["Action"] == "Audit"]
    assert [x["Resource"] for x in audited] == [str(box.mnt / "audited")]
    assert fan.stats.denied == 1 and fan.stats.errors == 0, fan.stats


def test_file_open_blocked_vs_allowed(box: Box) -> None:
    fan, seen = start(box)
    try:
        r = box.run("/bin/cat", str(box.mnt / "secret.txt"))
        assert denied(r), r
        r = box.run("/bin/cat", str(box.mnt / "public.txt"))
        assert r.returncode == 0 and r.stdout == "p\n"
        r = box.run("/bin/cat", str(box.mnt / "secret.txt"), in_cgroup=False)
        assert r.returncode == 0 and r.stdout == "s\n"
    finally:
        fan.stop()
    ((a, log),) = [(a, log) for a, log in seen if log["Action"] == "Block"]
    assert log["Operation"] == "File" and log["ProcessName"] == "/usr/bin/cat"
    assert a.cgroup_id == box.cgroup_id and not a.write


def test_read_only_rule_sees_write_intent(box: Box) -> None:
    ro = Policy(
        PolicyKind.KSP,
        "ro",
        "ns",
        Selector(),
        None,
        3,
        file=(FileRule(Target.PATH, f"{box.mnt}/public.txt", meta(Action.BLOCK), read_only=True),),
    )
    fan, seen = start(box, None, ro)
    try:
        assert box.run("/bin/cat", str(box.mnt / "public.txt")).returncode == 0
        r = box.run("/bin/sh", "-c", f"echo x >> {box.mnt}/public.txt")
        assert denied(r), r
    finally:
        fan.stop()
    assert [a.write for a, log in seen if log["PolicyName"] == "ro"] == [True]


def test_allow_list_posture_and_ignore_marks(box: Box) -> None:
    allow = Policy(
        PolicyKind.KSP,
        "only-allowed",
        "ns",
        Selector(),
        None,
        1,
        process=(
            ProcessRule(Target.DIR, "/usr/", meta(Action.ALLOW), recursive=True),
            ProcessRule(Target.PATH, f"{box.mnt}/allowed", meta(Action.ALLOW)),
        ),
    )
    fan, seen = start(box, DefaultPosture(file=Posture.BLOCK), allow)
    try:
        assert box.run(str(box.mnt / "allowed")).returncode == 0
        r = box.run(str(box.mnt / "audited"))  # not on the allow list
        assert denied(r)
    finally:
        fan.stop()
    posture = [log for _, log in seen if log["PolicyName"] == "DefaultPosture"]
    assert [p["Resource"] for p in posture] == [str(box.mnt / "audited")]


def test_unruled_files_get_ignore_marks(box: Box) -> None:
    fan, _ = start(box)
    try:
        for _ in range(3):
            assert box.run("/bin/cat", str(box.mnt / "public.txt")).returncode == 0
    finally:
        fan.stop()
    assert fan.stats.ignored_inodes >= 1
    # public.txt asked once, then ignored by the kernel: far fewer events than opens.
    assert fan.stats.events < 3, fan.stats


def test_reading_a_blocked_binary_does_not_unblock_its_exec(box: Box) -> None:
    # An ignore mark covers the inode for every event: a plain open of a ruled binary
    # must not leave one behind.
    fan, _ = start(box)
    try:
        assert box.run("/bin/dd", f"if={box.mnt / 'blocked'}", "of=/dev/null").returncode == 0
        assert denied(box.run(str(box.mnt / "blocked")))
    finally:
        fan.stop()


def test_watch_a_mount_in_another_mount_namespace(tmp_path: Path) -> None:
    """A container has its own mount namespace: it is marked through /proc/PID/root."""
    need_root()
    need(fanotify_available() is None, f"fanotify permission events: {fanotify_available()}")
    need(shutil.which("nsenter") and shutil.which("unshare"), "needs unshare and nsenter (util-linux)")
    d = tmp_path / "ct"
    d.mkdir()
    setup = (
        f"mount -t tmpfs ct {d} && echo s > {d}/secret && echo p > {d}/public && echo ready && exec sleep 60"
    )
    seen: list[str] = []

    def decide(a: Access) -> Decision:
        seen.append(a.path)
        return Decision(Action.BLOCK if a.path.endswith("/secret") else Action.ALLOW)

    with subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup],
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None
        try:
            assert holder.stdout.readline().strip() == "ready"
            fan = FanotifyEnforcer(decide)
            fan.watch_process(holder.pid, str(d))
            fan.start()
            try:

                def cat(name: str) -> subprocess.CompletedProcess[str]:
                    argv = ["nsenter", "-t", str(holder.pid), "-m", "cat", f"{d}/{name}"]
                    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)

                assert denied(cat("secret"))
                assert cat("public").stdout == "p\n"
            finally:
                fan.stop()
        finally:
            holder.kill()
    assert seen == [f"{d}/secret", f"{d}/public"]
    assert not (d / "secret").exists()  # the host's view of that directory is another mount
