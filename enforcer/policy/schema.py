"""JSON schemas for security.kubearmor.com/v1, written to match KubeArmor's CRDs.

Two views of the same structure:

* `openapi_schema(kind)`: the openAPIV3Schema a CustomResourceDefinition carries,
  equal (descriptions aside) to KubeArmor's own CRDs, so deploy/k8s can generate
  CRDs from it and a test can check we agree with KubeArmor.
* `json_schema(kind)`: the Draft 2020-12 schema the validator applies. It adds
  what the API server and kubectl enforce outside the openAPIV3Schema: the
  apiVersion and kind, metadata.name, and rejection of unknown fields (kubectl's
  default strict field validation).

Regex patterns are KubeArmor's verbatim. Like the API server (Go RE2 search),
jsonschema applies them unanchored, so `(tcp|...)$` also accepts "tcp,udp";
the semantic checks in enforcer.policy.parse take it from there.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from enforcer.policy.model import PolicyKind

__all__ = [
    "API_VERSION",
    "CAPABILITIES",
    "PATTERN_HINTS",
    "PROTOCOLS",
    "SYSCALLS",
    "json_schema",
    "openapi_schema",
]

API_VERSION = "security.kubearmor.com/v1"
GROUP = "security.kubearmor.com"

Schema = dict[str, Any]

# Patterns from KubeArmor's kubebuilder markers (common.go), unchanged.
PATH_PATTERN = r"^\/+.*[^\/]$"
DIR_PATTERN = r"^\/$|^\/.*\/$"
SYSCALL_PATH_PATTERN = r"(^\/+.*[^\/]$)|(^\/$|^\/.*\/$)"
EXECNAME_PATTERN = r"^[^\/]+$"
BANDWIDTH_PATTERN = r"^[0-9]+(KB|MB|GB|K|M|G)?$"

# matchProtocols values KubeArmor knows (its pattern lists each in lower and upper case).
PROTOCOLS = (
    "tcp",
    "udp",
    "raw",
    "icmp",
    "icmpv6",
    "sctp",
    "stream",
    "dgram",
    "rdm",
    "seqpacket",
    "dccp",
    "packet",
    "all",
)
PROTOCOL_PATTERN = "(" + "|".join(p for name in PROTOCOLS for p in (name, name.upper())) + ")$"

# The capabilities KubeArmor supports (getting-started/supported_capability_list.md).
CAPABILITIES = (
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
)
CAPABILITY_PATTERN = "(" + "|".join(CAPABILITIES) + ")$"

# The syscall enum of KubeArmor's CRDs (x86_64 numbering order).
_SYSCALL_NAMES = """
    read write open close stat fstat lstat poll lseek mmap mprotect munmap brk rt_sigaction rt_sigprocmask
    rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe select sched_yield mremap msync mincore
    madvise shmget shmat shmctl dup dup2 pause nanosleep getitimer alarm setitimer getpid sendfile socket
    connect accept sendto recvfrom sendmsg recvmsg shutdown bind listen getsockname getpeername socketpair
    setsockopt getsockopt clone fork vfork execve exit wait4 kill uname semget semop semctl shmdt msgget
    msgsnd msgrcv msgctl fcntl flock fsync fdatasync truncate ftruncate getdents getcwd chdir fchdir rename
    mkdir rmdir creat link unlink symlink readlink chmod fchmod chown fchown lchown umask gettimeofday
    getrlimit getrusage sysinfo times ptrace getuid syslog getgid setuid setgid geteuid getegid setpgid
    getppid getpgrp setsid setreuid setregid getgroups setgroups setresuid getresuid setresgid getresgid
    getpgid setfsuid setfsgid getsid capget capset rt_sigpending rt_sigtimedwait rt_sigqueueinfo
    rt_sigsuspend sigaltstack utime mknod uselib personality ustat statfs fstatfs sysfs getpriority
    setpriority sched_setparam sched_getparam sched_setscheduler sched_getscheduler sched_get_priority_max
    sched_get_priority_min sched_rr_get_interval mlock munlock mlockall munlockall vhangup modify_ldt
    pivot_root _sysctl prctl arch_prctl adjtimex setrlimit chroot sync acct settimeofday mount umount2
    swapon swapoff reboot sethostname setdomainname iopl ioperm create_module init_module delete_module
    get_kernel_syms query_module quotactl nfsservctl getpmsg putpmsg afs_syscall tuxcall security gettid
    readahead setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr
    removexattr lremovexattr fremovexattr tkill time futex sched_setaffinity sched_getaffinity
    set_thread_area io_setup io_destroy io_getevents io_submit io_cancel get_thread_area lookup_dcookie
    epoll_create epoll_ctl_old epoll_wait_old remap_file_pages getdents64 set_tid_address restart_syscall
    semtimedop fadvise64 timer_create timer_settime timer_gettime timer_getoverrun timer_delete
    clock_settime clock_gettime clock_getres clock_nanosleep exit_group epoll_wait epoll_ctl tgkill utimes
    vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend mq_timedreceive mq_notify
    mq_getsetattr kexec_load waitid add_key request_key keyctl ioprio_set ioprio_get inotify_init
    inotify_add_watch inotify_rm_watch migrate_pages openat mkdirat mknodat fchownat futimesat newfstatat
    unlinkat renameat linkat symlinkat readlinkat fchmodat faccessat pselect6 ppoll unshare set_robust_list
    get_robust_list splice tee sync_file_range vmsplice move_pages utimensat epoll_pwait signalfd
    timerfd_create eventfd fallocate timerfd_settime timerfd_gettime accept4 signalfd4 eventfd2
    epoll_create1 dup3 pipe2 inotify_init1 preadv pwritev rt_tgsigqueueinfo perf_event_open recvmmsg
    fanotify_init fanotify_mark prlimit64 name_to_handle_at open_by_handle_at clock_adjtime syncfs sendmmsg
    setns getcpu process_vm_readv process_vm_writev kcmp finit_module sched_setattr sched_getattr renameat2
    seccomp getrandom memfd_create kexec_file_load bpf execveat userfaultfd membarrier mlock2
    copy_file_range preadv2 pwritev2 pkey_mprotect pkey_alloc pkey_free statx io_pgetevents rseq
"""
SYSCALLS = tuple(_SYSCALL_NAMES.split())

# Human wording for pattern failures; the raw regex means little to a policy author.
PATTERN_HINTS: dict[str, str] = {
    PATH_PATTERN: "must be an absolute path that does not end with '/'",
    DIR_PATTERN: "must be an absolute directory path ending with '/'",
    SYSCALL_PATH_PATTERN: "must be an absolute file path, or a directory path ending with '/'",
    EXECNAME_PATTERN: "must be a program name without '/'",
    BANDWIDTH_PATTERN: "must be a bandwidth such as 500K, 10MB or 1G",
    PROTOCOL_PATTERN: "must be a protocol (" + ", ".join(PROTOCOLS) + "), in lower or upper case",
    CAPABILITY_PATTERN: "must be a capability KubeArmor supports, in lower case (e.g. net_raw)",
}

ACTIONS = ["Allow", "Audit", "Block"]


# -- building blocks ---------------------------------------------------------------------------


def _string(**kw: Any) -> Schema:
    return {"type": "string", **kw}


def _array(items: Schema, **kw: Any) -> Schema:
    return {"type": "array", "items": items, **kw}


def _object(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    s: Schema = {"type": "object", "properties": properties}
    if required:
        s["required"] = required
    return s


def _action() -> Schema:
    return _string(enum=list(ACTIONS))


def _severity() -> Schema:
    return {"type": "integer", "minimum": 1, "maximum": 10}


def _meta(*, action: bool = True) -> dict[str, Schema]:
    """severity/tags/message(/action): allowed on a policy, a section and (mostly) a rule."""
    m: dict[str, Schema] = {
        "severity": _severity(),
        "tags": _array(_string()),
        "message": _string(),
    }
    if action:
        m["action"] = _action()
    return m


def _path() -> Schema:
    return _string(maxLength=200, pattern=PATH_PATTERN)


def _from_source() -> Schema:
    return _array(_object({"path": _path()}))


def _syscall_from_source() -> Schema:
    return _array(_object({"path": _path(), "dir": _string(), "recursive": {"type": "boolean"}}))


def _bool() -> Schema:
    return {"type": "boolean"}


def _process() -> Schema:
    return _object(
        {
            "matchPaths": _array(
                _object(
                    {
                        "path": _path(),
                        "execname": _string(pattern=EXECNAME_PATTERN),
                        "allowedArgs": _array(_string(), maxItems=20),
                        "ownerOnly": _bool(),
                        "pts": _bool(),
                        "fromSource": _from_source(),
                        **_meta(),
                    }
                )
            ),
            "matchDirectories": _array(
                _object(
                    {
                        "dir": _string(pattern=DIR_PATTERN),
                        "recursive": _bool(),
                        "ownerOnly": _bool(),
                        "pts": _bool(),
                        "fromSource": _from_source(),
                        **_meta(),
                    },
                    ["dir"],
                )
            ),
            "matchPatterns": _array(
                _object({"pattern": _string(), "ownerOnly": _bool(), **_meta()}, ["pattern"])
            ),
            **_meta(),
        }
    )


def _file() -> Schema:
    return _object(
        {
            "matchPaths": _array(
                _object(
                    {
                        "path": _path(),
                        "readOnly": _bool(),
                        "ownerOnly": _bool(),
                        "pts": _bool(),
                        "fromSource": _from_source(),
                        **_meta(),
                    },
                    ["path"],
                )
            ),
            "matchDirectories": _array(
                _object(
                    {
                        "dir": _string(pattern=DIR_PATTERN),
                        "recursive": _bool(),
                        "readOnly": _bool(),
                        "ownerOnly": _bool(),
                        "pts": _bool(),
                        "fromSource": _from_source(),
                        **_meta(),
                    },
                    ["dir"],
                )
            ),
            "matchPatterns": _array(
                _object(
                    {"pattern": _string(), "readOnly": _bool(), "ownerOnly": _bool(), **_meta()},
                    ["pattern"],
                )
            ),
            **_meta(),
        }
    )


def _network(*, host: bool) -> Schema:
    protocol: dict[str, Schema] = {
        "protocol": _string(pattern=PROTOCOL_PATTERN),
        "fromSource": _from_source(),
        **_meta(),
    }
    if not host:
        protocol["pts"] = _bool()
    props: dict[str, Schema] = {
        # Host policies must name the acting binary (KubeArmor's MatchHostNetworkProtocolType).
        "matchProtocols": _array(_object(protocol, ["fromSource", "protocol"] if host else ["protocol"])),
        "matchDNSQueries": _array(
            _object({"domain": _string(), "fromSource": _from_source(), **_meta()}, ["domain"])
        ),
        **_meta(),
    }
    return _object(props)


def _capabilities(*, host: bool) -> Schema:
    rule = _object(
        {"capability": _string(pattern=CAPABILITY_PATTERN), "fromSource": _from_source(), **_meta()},
        ["capability", "fromSource"] if host else ["capability"],
    )
    return _object({"matchCapabilities": _array(rule), **_meta()})


def _syscalls() -> Schema:
    syscall_list = _array(_string(enum=list(SYSCALLS)))
    return _object(
        {
            "matchSyscalls": _array(_object({"syscall": syscall_list, "fromSource": _syscall_from_source()})),
            "matchPaths": _array(
                _object(
                    {
                        "path": _string(pattern=SYSCALL_PATH_PATTERN),
                        "recursive": _bool(),
                        "syscall": syscall_list,
                        "fromSource": _syscall_from_source(),
                    }
                )
            ),
            **_meta(action=False),
        }
    )


def _match_labels() -> Schema:
    return {"type": "object", "additionalProperties": _string()}


def _selector(*, keys: list[str], labels: bool) -> Schema:
    props: dict[str, Schema] = {
        "matchExpressions": _array(
            _object(
                {
                    "key": _string(enum=keys),
                    "operator": _string(enum=["In", "NotIn"]),
                    "values": _array(_string()),
                }
            )
        )
    }
    if labels:
        props["matchLabels"] = _match_labels()
    return _object(props)


def _device() -> Schema:
    int32 = {"type": "integer", "format": "int32"}
    rule = _object(
        {
            "class": _string(),
            "subClass": dict(int32),
            "protocol": dict(int32),
            "level": {**int32, "minimum": 1},
            **_meta(),
        },
        ["class"],
    )
    return _object({"matchDevice": _array(rule), **_meta()})


def _bandwidth_rule(peer: str) -> Schema:
    port = _object(
        {
            "port": _string(),
            "endPort": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535},
            "protocol": _string(enum=["TCP", "UDP", "SCTP", "tcp", "udp", "sctp"]),
        },
        ["port"],
    )
    return _array(
        _object(
            {
                peer: _array(_object({"ipBlock": _object({"cidr": _string()}, ["cidr"])}, ["ipBlock"])),
                "ports": _array(port),
                "iface": _array(_string()),
                "limit": _string(pattern=BANDWIDTH_PATTERN),
                "duration": _string(),
                "action": _action(),
                "message": _string(),
                "severity": {"type": "integer"},
                "tags": _array(_string()),
            }
        )
    )


# The CEL rules of KubeArmorNetworkPolicy; parse.py checks them (jsonschema cannot run CEL).
NSP_CEL_RULES: list[dict[str, str]] = [
    {
        "rule": "!(has(self.selector) && (has(self.selector.matchLabels) || "
        "has(self.selector.matchExpressions)) && has(self.nodeSelector))",
        "message": "A policy cannot target both containers and host nodes",
    },
    {
        "rule": "!(has(self.selector) && (has(self.selector.matchLabels) || "
        "has(self.selector.matchExpressions))) || !has(self.ingress) || "
        "self.ingress.all(i, has(i.limit) && has(i.duration))",
        "message": "Container policies strictly support only bandwidth quota rules; "
        "all ingress rules must declare both 'limit' and 'duration' only",
    },
    {
        "rule": "!(has(self.selector) && (has(self.selector.matchLabels) || "
        "has(self.selector.matchExpressions))) || !has(self.egress) || "
        "self.egress.all(e, has(e.limit) && has(e.duration))",
        "message": "Container policies strictly support only bandwidth quota rules; "
        "all egress rules must declare both 'limit' and 'duration' only",
    },
]


def _spec(kind: PolicyKind) -> Schema:
    if kind is PolicyKind.NSP:
        spec = _object(
            {
                "selector": _selector(keys=["label"], labels=True),
                "nodeSelector": _object({"matchLabels": _match_labels()}),
                "ingress": _bandwidth_rule("from"),
                "egress": _bandwidth_rule("to"),
                "level": _string(enum=["pod", "policy", "Pod", "Policy"]),
                **_meta(),
            }
        )
        spec["x-kubernetes-validations"] = copy.deepcopy(NSP_CEL_RULES)
        return spec
    host = kind is PolicyKind.HSP
    props: dict[str, Schema] = {
        "process": _process(),
        "file": _file(),
        "network": _network(host=host),
        "capabilities": _capabilities(host=host),
        "syscalls": _syscalls(),
        "apparmor": _string(),
        **_meta(),
    }
    if host:
        props["nodeSelector"] = _object({"matchLabels": _match_labels()})
        props["device"] = _device()
        return _object(props, ["nodeSelector"])
    if kind is PolicyKind.CSP:
        props["selector"] = _selector(keys=["namespace", "label"], labels=False)
    else:
        props["selector"] = _selector(keys=["label"], labels=True)
    props["presets"] = _array(_object({"name": _string(), "action": _action()}))
    return _object(props)


@cache
def _openapi(kind: PolicyKind) -> Schema:
    return _object(
        {
            "apiVersion": _string(),
            "kind": _string(),
            "metadata": {"type": "object"},
            "spec": _spec(kind),
            "status": _object({"status": _string()}),
        }
    )


def openapi_schema(kind: PolicyKind | str) -> Schema:
    """The CRD openAPIV3Schema of `kind` (a fresh copy: callers may add descriptions)."""
    return copy.deepcopy(_openapi(PolicyKind(kind)))


# Kubernetes object names: DNS-1123 subdomain (names) and label (namespaces).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
PATTERN_HINTS[DNS_SUBDOMAIN] = (
    "must be a valid Kubernetes name: lower-case letters, digits, '-' and '.', "
    "starting and ending with a letter or digit"
)
PATTERN_HINTS[DNS_LABEL] = (
    "must be a valid namespace name: lower-case letters, digits and '-', "
    "starting and ending with a letter or digit"
)


def _strict(node: Any) -> None:
    """Close every object that lists its properties: unknown fields become errors."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        node.pop("x-kubernetes-validations", None)
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)


@cache
def _json(kind: PolicyKind) -> Schema:
    s = openapi_schema(kind)
    _strict(s)
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["required"] = ["apiVersion", "kind", "metadata", "spec"]
    s["properties"]["apiVersion"]["const"] = API_VERSION
    s["properties"]["kind"]["const"] = kind.value
    # metadata stays open (labels, annotations, managedFields, ... from the API server).
    s["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": _string(minLength=1, maxLength=253, pattern=DNS_SUBDOMAIN),
            "namespace": _string(minLength=1, maxLength=63, pattern=DNS_LABEL),
        },
    }
    return s


def json_schema(kind: PolicyKind | str) -> Schema:
    """The Draft 2020-12 schema the validator applies to one document of `kind`."""
    return copy.deepcopy(_json(PolicyKind(kind)))
