"""Kernel-test scaffolding for the file, network and capability monitors (tests/test_bpf_*.py).

A test gets a watched cgroup named like a kubelet pod cgroup, an unwatched sibling, and its
own bpffs pin directory; all are removed afterwards. Children run a Python script inside a
cgroup and print what they observed (fds, ports) as JSON, so the test can compare every
record field with what the syscalls really returned.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enforcer.envelope import decode_batch, encode_batch
from tests.conftest import ROOT, need, need_cgroup2, need_root, need_tool


@dataclass
class Cgroups:
    watched: Path
    watched_id: int
    other: Path  # a sibling container cgroup nobody watches
    other_id: int
    pin_dir: Path


@contextmanager
def cgroups(obj: str) -> Iterator[Cgroups]:
    """Build bpf/.output/`obj`, then make the cgroups and the pin directory."""
    need_root()
    need_tool("clang")
    need_tool("bpftool")
    need(Path("/sys/kernel/btf/vmlinux").exists(), "needs kernel BTF at /sys/kernel/btf/vmlinux")
    cg_root = need_cgroup2()
    subprocess.run(["make", "-s", "-C", str(ROOT / "bpf"), f".output/{obj}"], check=True)

    from sensor.libbpf import ensure_bpffs

    ensure_bpffs()
    run = uuid.uuid4().hex
    pin_dir = Path("/sys/fs/bpf") / f"armorstream-test-{run[:12]}"
    # kubelet (cgroupfs driver) + containerd naming: kubepods/pod<uid>/<container id>
    pod = cg_root / f"as-test-{run[:8]}" / "kubepods" / f"pod{uuid.uuid4()}"
    watched, other = pod / (run + run)[:64], pod / (run[::-1] + run)[:64]
    watched.mkdir(parents=True)
    other.mkdir()
    try:
        yield Cgroups(watched, watched.stat().st_ino, other, other.stat().st_ino, pin_dir)
    finally:
        for p in sorted(pin_dir.rglob("*"), reverse=True) if pin_dir.exists() else []:
            p.rmdir() if p.is_dir() else p.unlink()
        if pin_dir.exists():
            pin_dir.rmdir()
        for d in (watched, other, pod, pod.parent, pod.parent.parent):
            if d.exists():
                d.rmdir()


def run_script(cgroup: Path, cwd: Path, script: str, *args: str, user: int | None = None) -> tuple[int, Any]:
    """Run `script` (Python) in `cgroup`; returns (host pid, the JSON it printed last).

    sh moves itself into the cgroup, then execs (setpriv, then) Python: one pid throughout.
    """
    drop = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    sh = 'echo $$ > "$0/cgroup.procs" && cd "$1" && shift && exec "$@"'
    argv = ["sh", "-c", sh, str(cgroup), str(cwd), *drop, sys.executable, "-I", "-c", script, *args]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, f"child failed ({p.returncode}): {err}"
    lines = out.strip().splitlines()
    return p.pid, json.loads(lines[-1]) if lines else None


def collect(
    drain: Any, done: Callable[[dict[int, np.ndarray]], bool], timeout: float = 10.0
) -> dict[int, np.ndarray]:
    """Drain until `done(records by kind)`; every batch goes through the Kafka envelope."""
    got: dict[int, list[np.ndarray]] = {}
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        for b in drain.poll(100):
            hdr, recs = decode_batch(encode_batch(b.kind, b.records, node="test-node", seq=seq))
            seq += 1
            assert (hdr.kind, hdr.count) == (b.kind, b.count)
            got.setdefault(b.kind, []).append(recs)
        merged = {k: np.concatenate(v) for k, v in got.items()}
        if done(merged):
            return merged
    raise AssertionError(f"the end marker never arrived; got kinds {sorted(got)}")
