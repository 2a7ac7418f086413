"""Boot a qemu guest kernel with the bpf LSM on and run a command inside it (as libbpf and
Tetragon test across kernels).

The guest boots from a tiny initramfs (busybox-static, the 9p modules, an init script);
it mounts the host's root over 9p read-only, puts tmpfs on /tmp, mounts proc, sysfs,
securityfs, bpffs and cgroup2, then chroots into it, so the guest runs this very
checkout with the venv's python. Software emulation (`-accel tcg`): no KVM needed.
Every run ends in `poweroff -f`; `-no-reboot` and `panic=-1` make a crashed guest exit.
Recipe and pitfalls: ../shared/NOTES.md.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODULES = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "fs/netfs/netfs.ko",
    "fs/fscache/fscache.ko",
    "net/9p/9pnet.ko",
    "net/9p/9pnet_virtio.ko",
    "fs/9p/9p.ko",
]
BEGIN, END = "=====AS-GUEST-BEGIN=====", "=====AS-GUEST-END====="

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in {modules}; do insmod /lib/mod/$m 2>/dev/null; done
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro hostroot /host || echo "AS-GUEST: 9p mount failed"
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t securityfs none /host/sys/kernel/security
mount -t bpf bpf /host/sys/fs/bpf
mount -t tmpfs tmp /host/sys/fs/cgroup
mkdir -p /host/sys/fs/cgroup/unified
mount -t cgroup2 none /host/sys/fs/cgroup/unified
mount -t tmpfs tmp /host/tmp
mount -t devtmpfs dev /host/dev
ip link set lo up
echo
echo "AS-GUEST-LSM: $(cat /host/sys/kernel/security/lsm)"
echo {begin}
chroot /host /bin/sh -s < /cmd 2>&1
echo "AS-GUEST-RC: $?"
echo {end}
poweroff -f
"""


@dataclass
class GuestResult:
    output: str  # what the command printed (between the markers)
    rc: int | None  # the command's exit status, None if it never finished
    lsm: str  # the guest's active LSM list
    console: str  # the whole serial console, for failure messages


def missing() -> str | None:
    """Why a guest cannot boot here, or None."""
    for tool in ("qemu-system-x86_64", "busybox", "cpio"):
        if not shutil.which(tool):
            return f"{tool} not installed (apt-get install qemu-system-x86 busybox-static cpio)"
    if kernel() is None:
        return "no /boot/vmlinuz-* (apt-get install linux-image-amd64)"
    return None


def kernel() -> Path | None:
    images = sorted(
        Path("/boot").glob("vmlinuz-*"),
        key=lambda p: [int(x) if x.isdigit() else x for x in p.name.replace("-", ".").split(".")],
    )
    return images[-1] if images else None


def build_initramfs(dest: Path, vmlinuz: Path, command: str, cwd: str) -> Path:
    release = vmlinuz.name.removeprefix("vmlinuz-")
    root = Path(tempfile.mkdtemp(prefix="as-initramfs-"))
    try:
        for d in ("bin", "proc", "sys", "lib/mod", "dev"):
            (root / d).mkdir(parents=True, exist_ok=True)
        busybox = shutil.which("busybox")
        assert busybox is not None
        shutil.copy2(busybox, root / "bin" / "busybox")
        names = []
        for m in MODULES:
            src = Path("/lib/modules") / release / "kernel" / m
            if src.exists():
                shutil.copy2(src, root / "lib/mod" / src.name)
                names.append(src.name)
        init = root / "init"
        init.write_text(INIT.format(modules=" ".join(names), begin=BEGIN, end=END))
        init.chmod(0o755)
        (root / "cmd").write_text(f"cd {cwd} || exit 99\n{command}\n")
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, capture_output=True, check=True
        ).stdout
        dest.write_bytes(gzip.compress(cpio, compresslevel=1))
        return dest
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(command: str, cwd: str, timeout: float = 240, memory_mb: int = 1024) -> GuestResult:
    """Boot the newest installed kernel, run `command` (a shell command) in `cwd`, power off."""
    vmlinuz = kernel()
    assert vmlinuz is not None
    with tempfile.TemporaryDirectory(prefix="as-vm-") as tmp:
        initrd = build_initramfs(Path(tmp) / "initramfs.gz", vmlinuz, command, cwd)
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            str(memory_mb),
            "-smp",
            "1",
            "-kernel",
            str(vmlinuz),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 lsm=lockdown,capability,landlock,yama,bpf panic=-1 quiet",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ]
        try:
            p = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                env={**os.environ, "TERM": "dumb"},
            )
            console = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""
            console = (out if isinstance(out, bytes) else out.encode()).decode(errors="replace")
            console += f"\n[harness: guest timed out after {timeout}s]"
    text = console.replace("\r\n", "\n")
    lsm = ""
    for line in text.splitlines():
        if "AS-GUEST-LSM: " in line:
            lsm = line.split("AS-GUEST-LSM: ", 1)[1].strip()
    body = text.split(BEGIN, 1)[1].split(END, 1)[0] if BEGIN in text and END in text else ""
    rc = None
    lines = body.strip("\n").splitlines()
    if lines and lines[-1].startswith("AS-GUEST-RC: "):
        rc = int(lines.pop().removeprefix("AS-GUEST-RC: "))
    return GuestResult("\n".join(lines), rc, lsm, text)
