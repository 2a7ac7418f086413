"""Runs inside the qemu guest (tests/vm/harness.py): BPF-LSM enforcement end to end.

Loads bpf/.output/lsm.bpf.o, moves itself into a test cgroup, installs a KubeArmor
policy for that cgroup, then tries blocked and neighbouring allowed operations of every
kind. Prints one line `AS-RESULT <json>`: each attempt's outcome and the records the
kernel emitted. The host-side test (test_lsm_vm.py) asserts on it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from enforcer.fanotify import CGROUP2_ROOT
from enforcer.policy.parse import parse_text
from enforcer.records import DTYPES, Kind
from sensor.enforce import LSM_OBJ, KernelRules

POLICY = """
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata: {name: vm-block, namespace: ns}
spec:
  severity: 7
  selector: {matchLabels: {app: vm}}
  process:
    matchPaths:
    - path: /tmp/blocked
  file:
    matchPaths:
    - path: /tmp/secret
    - path: /tmp/ro
      readOnly: true
    - path: /tmp/fs
      fromSource:
      - path: /usr/bin/cat
    matchDirectories:
    - dir: /tmp/private/
      recursive: true
  capabilities:
    matchCapabilities:
    - capability: chown
    - capability: net_raw
  action: Block
---
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata: {name: vm-net, namespace: ns}
spec:
  selector: {matchLabels: {app: vm}}
  network:
    matchProtocols:
    - protocol: tcp
  action: Block
"""


def attempt(fn) -> str:  # type: ignore[no-untyped-def]
    try:
        fn()
        return "ok"
    except OSError as e:
        return f"errno {e.errno}"


def run(*argv: str) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as e:  # the exec itself was refused
        return f"errno {e.errno}"
    return "ok" if r.returncode == 0 else f"rc {r.returncode}: {r.stderr.strip()[-80:]}"


def differential(kr: KernelRules, cgid: int, cases: int = 40) -> dict[str, object]:
    """Random file/process policies through the real LSM vs compiler.lookup_* (the model)."""
    import random

    from enforcer.compiler import lookup_exec, lookup_open
    from enforcer.policy.model import (
        Action,
        FileRule,
        FromSource,
        Policy,
        PolicyKind,
        ProcessRule,
        RuleMeta,
        Selector,
        Target,
    )  # fmt: skip
    from enforcer.workload import DefaultPosture, Posture

    files = ["/tmp/d/a/x", "/tmp/d/a/b/y", "/tmp/d/c/z", "/tmp/d/w"]
    bins = ["/tmp/d/bin/t1", "/tmp/d/bin/sub/t2"]
    for f in files:
        Path(f).parent.mkdir(parents=True, exist_ok=True)
        Path(f).write_text("x")
    for b in bins:
        Path(b).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2("/bin/true", b)
    os.chown("/tmp/d/c/z", 1000, -1)
    os.chown("/tmp/d/bin/sub/t2", 1000, -1)
    exe = os.readlink("/proc/self/exe")
    parent = os.readlink(f"/proc/{os.getppid()}/exe")
    dirs = ["/tmp/d/", "/tmp/d/a/", "/tmp/d/a/b/", "/tmp/d/c/", "/tmp/d/bin/", "/tmp/d/bin/sub/"]
    rng = random.Random(5)
    checked, bad = 0, []
    for case in range(cases):
        rules_f, rules_p = [], []
        for _ in range(rng.randint(1, 4)):
            a = rng.choice(list(Action))
            meta = RuleMeta(a, 1)
            src = (FromSource(path=rng.choice([exe, "/usr/bin/cat"])),) if rng.random() < 0.3 else ()
            if rng.random() < 0.6:
                if rng.random() < 0.5:
                    t, v, rec = Target.PATH, rng.choice(files), False
                else:
                    t, v, rec = Target.DIR, rng.choice(dirs), rng.random() < 0.5
                rules_f.append(FileRule(t, v, meta, rec, owner_only=rng.random() < 0.3,
                                        read_only=rng.random() < 0.3, from_source=src))  # fmt: skip
            else:
                if rng.random() < 0.5:
                    t, v, rec = Target.PATH, rng.choice(bins), False
                else:
                    t, v, rec = Target.DIR, rng.choice(dirs[4:]), rng.random() < 0.5
                rules_p.append(ProcessRule(t, v, meta, rec, owner_only=rng.random() < 0.3, from_source=src))
        pol = Policy(PolicyKind.KSP, f"diff{case}", "ns", Selector(), None, 1,
                     process=tuple(rules_p), file=tuple(rules_f))  # fmt: skip
        posture = DefaultPosture(file=rng.choice(list(Posture)))
        cs = kr.set_rules([pol], cgid, posture)
        for f in files:
            for write in (False, True):
                want = lookup_open(cs, cgid, f, (exe, parent), os.stat(f).st_uid == 0, write)
                got = attempt(lambda f=f, write=write: open(f, "a" if write else "r").close())
                checked += 1
                if (got == "errno 1") != want.blocked:
                    bad.append([case, f, write, got, str(want.action), want.posture])
        for b in bins:
            want = lookup_exec(cs, cgid, b, (exe,), os.stat(b).st_uid == 0)
            got = run(b)
            checked += 1
            if (got == "errno 1") != want.blocked:
                bad.append([case, b, "exec", got, str(want.action), want.posture, repr(pol), str(posture)])
    kr.remove(cgid)
    return {"checked": checked, "disagreements": bad[:10], "n_bad": len(bad)}


def main() -> None:
    out: dict[str, object] = {"lsm": Path("/sys/kernel/security/lsm").read_text().strip()}
    tmp = Path("/tmp")
    for name in ("blocked", "allowed"):
        shutil.copy2("/bin/true", tmp / name)
    for name in ("secret", "public", "ro", "fs", "chown-me"):
        (tmp / name).write_text(name + "\n")
    (tmp / "private/a").mkdir(parents=True)
    (tmp / "private/a/b").write_text("b\n")

    kr = KernelRules([LSM_OBJ], Path("/sys/fs/bpf/astest/enforce"), Path("/sys/fs/bpf/astest/shared")).load()
    kr.attach_lsm(pin=True)
    rb = kr.events()
    cg = Path(CGROUP2_ROOT) / "astest"
    cg.mkdir()
    (cg / "cgroup.procs").write_text(str(os.getpid()))
    cgid = cg.stat().st_ino

    # Sockets made before the rules, to reach connect/bind/listen/accept under them.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    s_conn, s_bind, s_listen = socket.socket(), socket.socket(), socket.socket()
    s_listen.bind(("127.0.0.1", 0))
    client = socket.create_connection(srv.getsockname())

    policies, errors = parse_text(POLICY, "vm-policy.yaml")
    assert not errors, errors
    kr.set_rules(policies, cgid)

    res: dict[str, str] = {}
    res["exec_blocked"] = run("/tmp/blocked")
    res["exec_allowed"] = run("/tmp/allowed")
    res["open_secret"] = attempt(lambda: open("/tmp/secret").close())
    res["open_public"] = attempt(lambda: open("/tmp/public").close())
    res["ro_read"] = attempt(lambda: open("/tmp/ro").close())
    res["ro_write"] = attempt(lambda: open("/tmp/ro", "a").close())
    res["dir_recursive"] = attempt(lambda: open("/tmp/private/a/b").close())
    res["from_source_cat"] = run("/usr/bin/cat", "/tmp/fs")
    res["from_source_python"] = attempt(lambda: open("/tmp/fs").close())
    res["chown"] = attempt(lambda: os.chown("/tmp/chown-me", 1000, -1))
    res["raw_socket"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1).close())
    res["tcp_socket"] = attempt(lambda: socket.socket().close())
    res["udp_socket"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
    res["connect"] = attempt(lambda: s_conn.connect(srv.getsockname()))
    res["bind"] = attempt(lambda: s_bind.bind(("127.0.0.1", 0)))
    res["listen"] = attempt(lambda: s_listen.listen(1))
    res["accept"] = attempt(lambda: srv.accept()[0].close())
    out["results"] = res
    # Rules removed: the same action passes again.
    kr.remove(cgid)
    out["exec_after_remove"] = run("/tmp/blocked")

    rb.poll(200)
    recs = []
    for kind, buf in rb.take():
        arr = np.frombuffer(buf, DTYPES[Kind(kind)])
        for r in arr:
            rec = {
                "kind": Kind(kind).name,
                "flags": int(r["hdr"]["flags"]),
                "ret": int(r["hdr"]["ret"]),
                "cgroup": int(r["hdr"]["cgroup_id"]) == cgid,
            }
            if "path" in arr.dtype.names:
                rec["path"] = bytes(r["path"]).split(b"\0", 1)[0].decode()
            if "op" in arr.dtype.names:
                rec["op"] = int(r["op"])
            if "cap" in arr.dtype.names:
                rec["cap"] = int(r["cap"])
            recs.append(rec)
    out["records"] = recs
    out["differential"] = differential(kr, cgid)
    for s in (client, srv, s_conn, s_bind, s_listen):
        s.close()
    print("AS-RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
