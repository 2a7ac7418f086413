/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * What every monitor does first and last: decide whether the current task is
 * watched for a concern (one hash lookup, before any other work), and fill the
 * common record header. Included by each monitor object (process, file, net, cap).
 */
#ifndef __AS_RECORD_BPF_H
#define __AS_RECORD_BPF_H

#include "armorstream.h"
#include "cast.bpf.h"
#include "compat.bpf.h"
#include "maps.bpf.h"

/* enum as_visibility bits for host tasks; set by the sensor before load. */
const volatile __u32 as_host_visible = 0;

/* Should `t` be reported for `bit`? Sets AS_F_HOST for host tasks. */
static __always_inline bool as_visible(__u64 cgid, struct task_struct *t, __u32 bit, __u32 *flags)
{
	__u32 *vis = bpf_map_lookup_elem(&as_watched, &cgid);

	if (vis)
		return *vis & bit;
	/* Host = the initial pid namespace (containers sharing the host pid ns count as host). */
	if ((as_host_visible & bit) && as_pid_level(t) == 0) {
		*flags |= AS_F_HOST;
		return true;
	}
	return false;
}

/* Identity of `t`, which must be the current task (uid/gid and comm come from helpers). */
static __always_inline void as_fill_hdr(struct as_hdr *h, struct task_struct *task, __u16 kind, __u32 size,
					__u64 cgid, __u32 flags)
{
	struct task_struct *parent = AS_READ(task, real_parent);
	struct pid *pid = AS_READ(task, group_leader, thread_pid);
	__u32 level = AS_READ(pid, level);
	struct upid up = as_upid_at(pid, level);
	__u64 ugid = bpf_get_current_uid_gid();

	h->kind = kind;
	h->version = AS_SCHEMA_VERSION;
	h->size = size;
	h->ktime_ns = as_boot_ns();
	h->cgroup_id = cgid;
	h->pid_ns = AS_READ(up.ns, ns.inum);
	h->mnt_ns = AS_READ(task, nsproxy, mnt_ns, ns.inum);
	h->host_pid = AS_READ(task, tgid);
	h->host_ppid = AS_READ(parent, tgid);
	h->pid = up.nr;
	h->ppid = as_tgid_at_fast(parent, level);
	h->uid = (__u32)ugid;
	h->gid = ugid >> 32;
	h->ret = 0;
	h->flags = flags;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
}

/*
 * Ring-buffer memory is not zeroed: strings must be NUL-padded and nothing may
 * leak. clang will not inline a large memset for BPF, so store words (volatile, or
 * clang turns the loop back into a memset). `size` must be a multiple of 8.
 */
#define AS_ZERO(rec)                                               \
	do {                                                       \
		volatile __u64 *__w = (volatile __u64 *)(rec);     \
		_Pragma("unroll") for (int __i = 0; __i < sizeof(*(rec)) / 8; __i++) \
			__w[__i] = 0;                              \
	} while (0)

#endif /* __AS_RECORD_BPF_H */
