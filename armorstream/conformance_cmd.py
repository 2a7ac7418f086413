"""`armorstream conformance run DIR...`: KubeArmor's test scenarios against the real enforcement.

A scenario is a directory holding policy YAMLs and files `cmd1`, `cmd2`, ...:

    source: ubuntu-1-deployment
    cmd: dash -c "cat /etc/hostname"
    result: failed
    ---
    operation: File
    condition: /etc/hostname
    action: Block

`source` names a Deployment (from the scenario directory, its parents, or --workloads);
the command runs in a test container of that workload: its own cgroup, named like a
kubelet pod's, with new pid and uts namespaces, chrooted into a private bind mount of
the host root (in the runner's own mount namespace). That bind mount is what the
fanotify backend marks, so nothing else on the machine pays for the permission events.
Network rules are enforced by cgroup BPF attached above the containers. `result` says
whether the command should succeed; the block after `---` is the alert expected (none:
no alert at all).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shlex
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from armorstream.simulate_cmd import parse_default_posture
from enforcer.compiler import CompiledSet, Decision, compile_workload
from enforcer.errors import ArmorstreamError, PolicyErrors
from enforcer.fanotify import CGROUP2_ROOT, Access, CompiledDecider, FanotifyEnforcer
from enforcer.matcher import Matcher
from enforcer.policy.model import Policy
from enforcer.policy.parse import load_policies
from enforcer.records import NET_DTYPE, Flag, Kind
from enforcer.workload import DefaultPosture, Workload

__all__ = ["ConformanceError", "Expected", "Scenario", "Step", "conformance", "load_scenarios"]

CLONE_NEWNS = 0x0002_0000
_FAMILIES: dict[int, str] = {int(socket.AF_INET): "AF_INET", int(socket.AF_INET6): "AF_INET6"}
_TYPES: dict[int, str] = {
    int(socket.SOCK_STREAM): "SOCK_STREAM",
    int(socket.SOCK_DGRAM): "SOCK_DGRAM",
    int(socket.SOCK_RAW): "SOCK_RAW",
}


class ConformanceError(ArmorstreamError):
    """A scenario that cannot be read or a runtime that cannot start (names the file)."""


@dataclass(frozen=True, slots=True)
class Expected:
    operation: str
    condition: str
    action: str

    def matches(self, alert: dict[str, object]) -> bool:
        return (
            str(alert.get("Operation", "")) == self.operation
            and self.condition in str(alert.get("Resource", ""))
            and str(alert.get("Action", "")) == self.action
        )


@dataclass(frozen=True, slots=True)
class Step:
    file: Path
    source: str
    cmd: str
    should_pass: bool
    alert: Expected | None


@dataclass
class Scenario:
    dir: Path
    policies: list[Policy]
    steps: list[Step]
    annotations: dict[str, dict[str, str]] = field(default_factory=dict)  # its own Namespace docs

    @property
    def name(self) -> str:
        return self.dir.name


def _yaml_docs(path: Path) -> list[Any]:
    try:
        return [d for d in YAML(typ="safe").load_all(path.read_text())]
    except (OSError, YAMLError) as e:
        raise ConformanceError(f"{path}: {e}") from e


def _step(path: Path) -> Step:
    docs = _yaml_docs(path)
    head = docs[0] if docs else None
    if not isinstance(head, dict) or not {"source", "cmd", "result"} <= head.keys():
        raise ConformanceError(f"{path}: the first document needs source, cmd and result")
    result = str(head["result"]).strip().lower()
    if result not in ("passed", "failed"):
        raise ConformanceError(f"{path}: result must be passed or failed, not {head['result']!r}")
    alert = None
    if len(docs) > 1 and docs[1]:
        a = docs[1]
        if not isinstance(a, dict) or not {"operation", "condition", "action"} <= a.keys():
            raise ConformanceError(f"{path}: the alert needs operation, condition and action")
        alert = Expected(str(a["operation"]), str(a["condition"]), str(a["action"]))
    return Step(path, str(head["source"]), str(head["cmd"]), result == "passed", alert)


def _step_files(d: Path) -> list[Path]:
    files = [p for p in d.iterdir() if p.is_file() and p.name.startswith("cmd") and p.name[3:].isdigit()]
    return sorted(files, key=lambda p: int(p.name[3:]))


def load_scenarios(paths: Iterable[Path]) -> list[Scenario]:
    """Each path is a scenario directory or holds scenario directories (any depth)."""
    dirs: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise ConformanceError(f"{p}: not a directory")
        dirs.extend(sorted({f.parent for f in p.rglob("cmd*") if f.is_file() and f.name[3:].isdigit()}))
    out = []
    for d in dirs:
        yamls = sorted([*d.glob("*.yaml"), *d.glob("*.yml")])
        try:
            policies = load_policies(yamls) if yamls else []
        except PolicyErrors as e:
            raise ConformanceError(f"{d}: {e}") from e
        own = Workloads()
        for y in yamls:
            own.add_file(y)
        out.append(Scenario(d, policies, [_step(f) for f in _step_files(d)], own.annotations))
    return out


@dataclass
class Workloads:
    """Deployments (by name) and namespace annotations from Kubernetes YAML files."""

    deployments: dict[str, Workload] = field(default_factory=dict)
    annotations: dict[str, dict[str, str]] = field(default_factory=dict)

    def add_file(self, path: Path) -> None:
        for doc in _yaml_docs(path):
            if not isinstance(doc, dict):
                continue
            meta = doc.get("metadata") or {}
            if doc.get("kind") == "Namespace":
                self.annotations[str(meta.get("name", ""))] = {
                    str(k): str(v) for k, v in (meta.get("annotations") or {}).items()
                }
            elif doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Pod"):
                spec = doc.get("spec") or {}
                tmpl = spec.get("template") or {"metadata": meta, "spec": spec}
                labels = {
                    str(k): str(v) for k, v in ((tmpl.get("metadata") or {}).get("labels") or {}).items()
                }
                containers = (tmpl.get("spec") or {}).get("containers") or [{}]
                name = str(meta.get("name", ""))
                self.deployments[name] = Workload.container(
                    str(meta.get("namespace", "default")), labels, str(containers[0].get("name", "")), name
                )

    def add_dir(self, d: Path) -> None:
        for p in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
            with contextlib.suppress(ConformanceError):
                self.add_file(p)


# ---- the runtime: test containers, fanotify, cgroup BPF ---------------------------------


def _unshare_mounts() -> None:
    """Our own mount namespace: the containers' bind mounts vanish when we exit."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise ConformanceError(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)


@dataclass
class Container:
    workload: Workload
    cgroup: Path
    root: Path

    @property
    def cgroup_id(self) -> int:
        return self.cgroup.stat().st_ino

    def run(self, cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        # The outer shell (host root, not watched) joins the cgroup; the command runs chrooted
        # into the watched bind mount with fresh pid/uts namespaces.
        # No new mount namespace: it would copy the bind mount, and fanotify marks one mount.
        # (A real container's mount is marked through /proc/PID/root instead.)
        inner = ["unshare", "--pid", "--uts", "--fork", "chroot", str(self.root), *shlex.split(cmd)]
        script = f'echo $$ > {self.cgroup}/cgroup.procs && exec "$@"'
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
        try:
            return subprocess.run(
                ["/bin/sh", "-c", script, "sh", *inner],
                capture_output=True, text=True, timeout=timeout, check=False, env=env,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, 124, "", f"timed out after {timeout}s")


class Runtime:
    """Test containers plus the enforcement backends that run on this kernel."""

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher
        self.base_annotations = dict(matcher.namespace_annotations)
        self.base = Path(CGROUP2_ROOT) / f"armorstream-conformance-{os.getpid()}"
        self.pins = Path(f"/sys/fs/bpf/armorstream-conformance-{os.getpid()}")
        self.containers: dict[str, Container] = {}
        self.sets: dict[int, CompiledSet] = {}
        self.alerts: list[dict[str, object]] = []
        self.decider = CompiledDecider()
        self.fan: FanotifyEnforcer | None = None
        self.kernel: Any = None
        self.rb: Any = None
        self.notes: list[str] = []

    def __enter__(self) -> Runtime:
        if os.geteuid() != 0:
            raise ConformanceError("conformance runs need root (cgroups, mounts, BPF, fanotify)")
        _unshare_mounts()  # before any thread starts
        self.base.mkdir()
        try:
            from sensor.enforce import NETBLOCK_OBJ, KernelRules

            self.kernel = KernelRules([NETBLOCK_OBJ], self.pins / "enforce", self.pins / "shared").load()
            self.kernel.attach_cgroup(self.base, pin=False)
            self.rb = self.kernel.events()
        except ArmorstreamError as e:
            self.notes.append(f"network rules not enforced: {e}")
            self.kernel = None
        self.fan = FanotifyEnforcer(self.decider, self._report, static=self.decider.static).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fan is not None:
            self.fan.stop()
        if self.rb is not None:
            self.rb.close()
        if self.kernel is not None:
            from sensor.enforce import unpin_all

            self.kernel.close()
            unpin_all(self.pins / "enforce")
            unpin_all(self.pins / "shared")
            with contextlib.suppress(OSError):
                self.pins.rmdir()
        cs = list(self.containers.values())
        for c in reversed(cs):  # later binds hold copies of earlier ones
            subprocess.run(["umount", "-l", str(c.root)], check=False, capture_output=True)  # whole subtree
        for c in cs:
            with contextlib.suppress(OSError):
                c.root.rmdir()
            for d in (c.cgroup, c.cgroup.parent):
                with contextlib.suppress(OSError):
                    d.rmdir()
        with contextlib.suppress(OSError):
            self.base.rmdir()

    def _report(self, a: Access, d: Decision) -> None:
        self.alerts.append(a.log(d))

    def container(self, source: str, workload: Workload) -> Container:
        c = self.containers.get(source)
        if c is None:
            pod = self.base / f"kubepods-pod{uuid.uuid4().hex}.slice"
            cg = pod / f"cri-containerd-{uuid.uuid4().hex}{uuid.uuid4().hex}.scope"
            cg.mkdir(parents=True)
            root = Path(tempfile.mkdtemp(prefix=f"as-ct-{source}-"))
            subprocess.run(["mount", "--rbind", "/", str(root)], check=True)
            c = Container(workload, cg, root)
            self.containers[source] = c
            assert self.fan is not None
            self.fan.watch(str(root))
        return c

    def set_policies(self, scenario: Scenario) -> None:
        """Compile each container's policies of this scenario into the backends."""
        annotations = {**self.base_annotations, **scenario.annotations}
        self.matcher = Matcher(scenario.policies, self.matcher.default_posture, annotations)
        for c in self.containers.values():
            mine = self.matcher.policies_for(c.workload)
            posture = self.matcher.posture_for(c.workload)
            cs = compile_workload(mine, c.cgroup_id, posture)
            self.sets[c.cgroup_id] = cs
            if self.kernel is not None:
                self.kernel.set_rules(mine, c.cgroup_id, posture)
        self.decider.replace(self.sets)
        if self.fan is not None:
            self.fan.reset()  # drop ignore marks made under the previous rules

    def net_alerts(self) -> None:
        if self.rb is None:
            return
        self.rb.poll(0)
        for kind, buf in self.rb.take():
            if kind != Kind.NET:
                continue
            for r in np.frombuffer(buf, NET_DTYPE):
                flags = int(r["hdr"]["flags"])
                fam = _FAMILIES.get(int(r["family"]), str(int(r["family"])))
                typ = _TYPES.get(int(r["type"]) & 0xF, str(int(r["type"])))
                self.alerts.append(
                    {
                        "Operation": "Network",
                        "Resource": f"domain={fam} type={typ} protocol={int(r['protocol'])}",
                        "Action": "Block" if flags & Flag.BLOCKED else "Audit",
                        "Result": "Permission denied" if flags & Flag.BLOCKED else "Passed",
                        "PolicyName": "DefaultPosture" if flags & Flag.POSTURE else "",
                        "Enforcer": "CgroupBPF",
                        "HostPID": int(r["hdr"]["host_pid"]),
                    }
                )


def run_scenarios(
    scenarios: list[Scenario], workloads: Workloads, posture: DefaultPosture, echo: Any = click.echo
) -> tuple[int, int]:
    passed = failed = 0
    with Runtime(Matcher([], posture, workloads.annotations)) as rt:
        for note in rt.notes:
            echo(click.style(f"note: {note}", fg="yellow"))
        for sc in scenarios:
            for step in sc.steps:
                wl = workloads.deployments.get(step.source)
                if wl is None:
                    raise ConformanceError(
                        f"{step.file}: unknown source {step.source!r} (no such Deployment)"
                    )
                rt.container(step.source, wl)
            rt.set_policies(sc)
            for step in sc.steps:
                c = rt.containers[step.source]
                rt.alerts.clear()
                r = c.run(step.cmd)
                rt.net_alerts()
                ran_ok = r.returncode == 0
                problems = []
                if ran_ok != step.should_pass:
                    why = (r.stderr.strip().splitlines() or [""])[-1][:120]
                    problems.append(f"command {'passed' if ran_ok else 'failed'}{f' ({why})' if why else ''}")
                relevant = [a for a in rt.alerts if a.get("Action") in ("Block", "Audit")]
                if step.alert is not None and not any(step.alert.matches(a) for a in relevant):
                    seen = (
                        "; ".join(f"{a['Operation']} {a['Resource']} {a['Action']}" for a in relevant)
                        or "none"
                    )
                    problems.append(
                        f"no {step.alert.action} alert for {step.alert.operation} {step.alert.condition} "
                        f"(saw: {seen})"
                    )
                if step.alert is None and relevant:
                    problems.append(f"unexpected alert: {relevant[0]['Operation']} {relevant[0]['Resource']}")
                label = f"{sc.name}/{step.file.name}: {step.cmd}"
                if problems:
                    failed += 1
                    echo(f"{click.style('FAIL', fg='red', bold=True)} {label}: {'; '.join(problems)}")
                else:
                    passed += 1
                    echo(f"{click.style('PASS', fg='green', bold=True)} {label}")
    return passed, failed


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def conformance() -> None:
    """Run KubeArmor-style enforcement scenarios against the real kernel."""


@conformance.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option(
    "--workloads", "workload_dirs", multiple=True, type=click.Path(path_type=Path, exists=True),
    help="Directory or file of Deployment/Namespace YAMLs (scenario dirs and parents are searched too).",
)  # fmt: skip
@click.option(
    "--default-posture", "postures", multiple=True, default=("audit",), show_default=True,
    help='"block", "audit", or per kind: "file=block,network=audit".',
)  # fmt: skip
def run(dirs: tuple[Path, ...], workload_dirs: tuple[Path, ...], postures: tuple[str, ...]) -> None:
    """Run every scenario under DIRS; prints PASS/FAIL per command and `N passed, N failed`."""
    try:
        scenarios = load_scenarios(dirs)
        if not scenarios:
            raise ConformanceError("no scenarios (directories with cmd1, cmd2, ... files) found")
        wl = Workloads()
        for w in workload_dirs:
            wl.add_file(w) if w.is_file() else wl.add_dir(w)
        for sc in scenarios:
            for d in (sc.dir, *sc.dir.parents[:2]):  # the scenario, its suite, the suites' root
                wl.add_dir(d)
        passed, failed = run_scenarios(scenarios, wl, parse_default_posture(postures))
    except ArmorstreamError as e:
        raise click.ClickException(str(e)) from e
    click.secho(f"{passed} passed, {failed} failed", fg="red" if failed else "green", bold=True)
    if failed:
        raise SystemExit(1)
