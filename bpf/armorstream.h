/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * armorstream record contract: the one definition of every binary record the
 * kernel side emits and user space decodes. Included by every *.bpf.c and
 * mirrored field-for-field by enforcer/records.py (checked against this
 * object's BTF by tests/test_record_layout.py).
 *
 * Rules:
 *  - No kernel headers: fixed-width types only, so it compiles on both sides.
 *  - Little-endian, every field naturally aligned, explicit padding (_pad*).
 *  - Kind and op numbers are never reused; retired numbers stay reserved.
 *  - A change to any layout bumps AS_SCHEMA_VERSION.
 */
#ifndef __ARMORSTREAM_H
#define __ARMORSTREAM_H

#ifndef __VMLINUX_H__
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed int __s32;
typedef signed long long __s64;
#endif

#define AS_SCHEMA_VERSION 1

#define AS_COMM_LEN 16
#define AS_PATH_LEN 256 /* KubeArmor's BPF maps use 256-byte paths too */
#define AS_ARGS_LEN 512 /* argv, NUL-separated */
#define AS_ADDR_LEN 16  /* IPv4 in the first 4 bytes, or IPv6 */

/* Record kinds. Never reuse a number. */
enum as_kind {
	AS_KIND_EXEC = 1,
	AS_KIND_EXIT = 2,
	AS_KIND_FORK = 3,
	AS_KIND_FILE = 4,
	AS_KIND_NET = 5,
	AS_KIND_CAP = 6,
	AS_KIND_LOST = 7, /* the kernel dropped records: hdr.ret = count */
};

/* hdr.flags bits */
enum as_flag {
	AS_F_TRUNC_PATH = 1 << 0, /* a path field was cut at AS_PATH_LEN */
	AS_F_TRUNC_ARGS = 1 << 1, /* argv was cut at AS_ARGS_LEN */
	AS_F_BLOCKED = 1 << 2,    /* the fast path denied this action */
	AS_F_AUDITED = 1 << 3,    /* a kernel audit rule matched */
	AS_F_HOST = 1 << 4,       /* process is in the host's namespaces */
	AS_F_POSTURE = 1 << 5,    /* decided by default posture, not a rule */
	/* Which fast-path backend decided a BLOCKED/AUDITED record (the alert's Enforcer). */
	AS_F_ENF_BPFLSM = 1 << 6,
	AS_F_ENF_FANOTIFY = 1 << 7,
	AS_F_ENF_CGROUP = 1 << 8,
};

/* Network operations (as_net_rec.op). Never reuse a number. */
enum as_net_op {
	AS_NET_SOCKET = 1,
	AS_NET_CONNECT = 2,
	AS_NET_BIND = 3,
	AS_NET_LISTEN = 4,
	AS_NET_ACCEPT = 5,
};

/*
 * Visibility bits: value of the as_watched map (cgroup id -> bits) and of each
 * object's `as_host_visible` knob; KubeArmor's kubearmor-visibility annotation.
 */
enum as_visibility {
	AS_VIS_PROCESS = 1 << 0,
	AS_VIS_FILE = 1 << 1,
	AS_VIS_NETWORK = 1 << 2,
	AS_VIS_CAPABILITIES = 1 << 3,
};

/* Common header of every record: who did it, where, when, with what result. */
struct as_hdr {
	__u16 kind;      /* enum as_kind */
	__u16 version;   /* AS_SCHEMA_VERSION */
	__u32 size;      /* sizeof the whole record */
	__u64 ktime_ns;  /* bpf_ktime_get_boot_ns() */
	__u64 cgroup_id; /* cgroup v2 id: maps to the container */
	__u32 pid_ns;    /* pid namespace inode number */
	__u32 mnt_ns;    /* mount namespace inode number */
	__u32 host_pid;  /* tgid in the initial pid namespace */
	__u32 host_ppid;
	__u32 pid;       /* tgid as the container sees it */
	__u32 ppid;
	__u32 uid;
	__u32 gid;
	__s32 ret;       /* result: 0 or a negative errno */
	__u32 flags;     /* enum as_flag bits */
	char comm[AS_COMM_LEN];
};

struct as_exec_rec {
	struct as_hdr hdr;
	__u32 argc;
	__u32 args_len;  /* bytes used in args */
	__u64 exe_ino;   /* inode of the executed file */
	__u32 exe_uid;   /* owner of the executed file (ownerOnly) */
	__u32 _pad0;
	char parent_comm[AS_COMM_LEN];
	char path[AS_PATH_LEN];   /* absolute path of the executed file */
	char cwd[AS_PATH_LEN];
	char args[AS_ARGS_LEN];   /* argv[0]\0argv[1]\0... */
};

struct as_exit_rec {
	struct as_hdr hdr;
	__s32 exit_code;  /* wait status as the parent sees it */
	__u32 _pad0;
};

struct as_fork_rec {
	struct as_hdr hdr;  /* the parent */
	__u32 child_host_pid;
	__u32 child_pid;
};

struct as_file_rec {
	struct as_hdr hdr;
	__u32 open_flags; /* O_* flags as passed */
	__u32 mode;
	__u64 ino;
	__u32 dev;
	__u32 owner_uid;  /* owner of the file, 0xffffffff if unknown */
	char path[AS_PATH_LEN]; /* absolute: dirfd and cwd resolved */
};

struct as_net_rec {
	struct as_hdr hdr;
	__u16 op;        /* enum as_net_op */
	__u16 family;    /* AF_INET, AF_INET6, AF_UNIX, ... */
	__u16 type;      /* SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, ... */
	__u16 protocol;  /* IPPROTO_* */
	__u16 sport;     /* host byte order */
	__u16 dport;
	__s32 fd;
	__u8 saddr[AS_ADDR_LEN];
	__u8 daddr[AS_ADDR_LEN];
};

struct as_cap_rec {
	struct as_hdr hdr;
	__u32 cap;       /* CAP_* number */
	__u32 syscall;   /* syscall that asked for it, if known */
};

#ifdef __cplusplus
#define AS_STATIC_ASSERT static_assert
#else
#define AS_STATIC_ASSERT _Static_assert
#endif
AS_STATIC_ASSERT(sizeof(struct as_hdr) == 80, "as_hdr layout changed");
AS_STATIC_ASSERT(sizeof(struct as_exec_rec) == 1144, "as_exec_rec layout changed");
AS_STATIC_ASSERT(sizeof(struct as_exit_rec) == 88, "as_exit_rec layout changed");
AS_STATIC_ASSERT(sizeof(struct as_fork_rec) == 88, "as_fork_rec layout changed");
AS_STATIC_ASSERT(sizeof(struct as_file_rec) == 360, "as_file_rec layout changed");
AS_STATIC_ASSERT(sizeof(struct as_net_rec) == 128, "as_net_rec layout changed");
AS_STATIC_ASSERT(sizeof(struct as_cap_rec) == 88, "as_cap_rec layout changed");

#endif /* __ARMORSTREAM_H */
