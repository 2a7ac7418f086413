// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Capability monitor: capability checks made for a watched task (AS_VIS_CAPABILITIES),
 * one as_cap_rec each in as_cap_rb: which capability, granted (ret 0) or not
 * (-EPERM), and the syscall that asked.
 *
 * Two hooks; the sensor loads the first the kernel accepts (sensor/monitors.py):
 *  - tp_btf/cap_capable: the capability:cap_capable tracepoint (Linux 6.14+), at the
 *    end of the capability module's check: sees grants and denials. It does not say
 *    whether the caller asked for no audit, so it also sees the kernel's silent probes
 *    (e.g. CAP_SYS_ADMIN on every mmap accounting check).
 *  - lsm/capable: the bpf LSM hook (5.7+, needs BPF trampolines and "bpf" in the
 *    active LSM list). Runs after the capability module and only when it granted, so
 *    it sees grants only; CAP_OPT_NOAUDIT probes are skipped.
 * A process that keeps asking for the same capability with the same outcome is
 * reported once per as_cap_window_ns (0: every check), which keeps the silent
 * probes from flooding the ring.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "armorstream.h"
#include "record.bpf.h"

#define AS_CAP_OPT_NOAUDIT (1 << 1) /* include/linux/security.h */
#define AS_PF_KTHREAD 0x00200000

/* Report a repeated (process, capability, outcome) at most once per window; set before load. */
const volatile __u64 as_cap_window_ns = 1000000000;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} as_cap_rb SEC(".maps");

struct as_cap_key {
	__u32 tgid;
	__u32 cap_denied; /* cap | denied << 16 */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct as_cap_key);
	__type(value, __u64); /* boot ns of the last report */
} as_cap_seen SEC(".maps");

/* The syscall the task is in (what asked for the capability), or 0xffffffff. */
static __always_inline __u32 as_syscall_nr(struct task_struct *t)
{
	if (BPF_CORE_READ(t, flags) & AS_PF_KTHREAD)
		return 0xffffffff;
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(t);
#if defined(__TARGET_ARCH_x86)
	return BPF_CORE_READ(regs, orig_ax);
#elif defined(__TARGET_ARCH_arm64)
	return BPF_CORE_READ(regs, syscallno);
#else
	return 0xffffffff;
#endif
}

static __always_inline void as_cap(int cap, int ret)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	struct task_struct *t = bpf_get_current_task_btf();
	__u32 flags = 0;

	if (!as_visible(cgid, t, AS_VIS_CAPABILITIES, &flags))
		return;
	if (as_cap_window_ns) {
		struct as_cap_key k = {.tgid = bpf_get_current_pid_tgid() >> 32,
				       .cap_denied = (cap & 0xffff) | (ret ? 1 << 16 : 0)};
		__u64 now = as_boot_ns();
		__u64 *last = bpf_map_lookup_elem(&as_cap_seen, &k);

		if (last && now - *last < as_cap_window_ns)
			return;
		bpf_map_update_elem(&as_cap_seen, &k, &now, BPF_ANY);
	}
	struct as_cap_rec *r = as_reserve(&as_cap_rb, sizeof(*r), AS_KIND_CAP);
	if (!r)
		return;
	as_fill_hdr(&r->hdr, t, AS_KIND_CAP, sizeof(*r), cgid, flags);
	r->hdr.ret = ret;
	r->cap = cap;
	r->syscall = as_syscall_nr(t);
	bpf_ringbuf_submit(r, 0);
}

SEC("tp_btf/cap_capable")
int BPF_PROG(as_cap_tp, const struct cred *cred, struct user_namespace *target_ns,
	     const struct user_namespace *capable_ns, int cap, int ret)
{
	as_cap(cap, ret);
	return 0;
}

SEC("lsm/capable")
int BPF_PROG(as_cap_lsm, const struct cred *cred, struct user_namespace *ns, int cap, unsigned int opts, int ret)
{
	if (!(opts & AS_CAP_OPT_NOAUDIT))
		as_cap(cap, ret);
	return 0; /* observe only: never change the decision */
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
