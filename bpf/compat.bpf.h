/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Kernel-version differences, each with the change that caused it. Everything
 * else reads kernel structs through CO-RE (BPF_CORE_READ) and needs no shim.
 */
#ifndef __AS_COMPAT_BPF_H
#define __AS_COMPAT_BPF_H

#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>

/*
 * bpf_ktime_get_boot_ns() appeared in 5.8 (commit 71d19214776e, "bpf: add
 * bpf_ktime_get_boot_ns()"). Before it, monotonic time is the best there is; it
 * stops during suspend, so wall-clock conversion drifts on laptops, not servers.
 */
static __always_inline __u64 as_boot_ns(void)
{
	if (bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_ktime_get_boot_ns))
		return bpf_ktime_get_boot_ns();
	return bpf_ktime_get_ns();
}

/*
 * Plain loads instead of one bpf_probe_read_kernel call per field. bpf_rdonly_cast (6.2,
 * "bpf: Add a kfunc for generic type cast") turns any kernel address into a typed,
 * read-only, untrusted pointer: its fields are read with ordinary loads that the
 * verifier makes fault-safe (a bad pointer reads as 0, as a failed probe read does), and
 * the call itself is inlined to a register move. A helper call costs ~30-40 ns on this VM;
 * the file monitor's exit made ~50 of them per watched open (bench/sensor_overhead.py).
 * With btf_id 0 the result is untyped memory, which may be indexed by a variable.
 */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

#define as_cast(p, type) ((type *)bpf_rdonly_cast((const void *)(p), bpf_core_type_id_kernel(type)))
#define as_untyped(p) ((const char *)bpf_rdonly_cast((const void *)(p), 0))

/*
 * task_struct::thread_pid replaced pids[PIDTYPE_PID].pid in 4.19 (commit
 * 2c4704756cab, "pids: Move the pgrp and session pid pointers from task_struct to
 * signal_struct"). armorstream needs ring buffers (5.8), so only the new form is read.
 *
 * Returns the thread group leader's pid number at pid-namespace `level`, or 0 when
 * the task is not visible there (a parent outside the container's namespace).
 */
static __always_inline struct upid as_upid_at(struct pid *pid, __u32 level)
{
	struct upid up = {};

	/* numbers[] is indexed by a variable: read it through an untyped pointer */
	bpf_probe_read_kernel(&up, sizeof(up), as_untyped(pid) + bpf_core_field_offset(struct pid, numbers) +
						       (level & 31) * bpf_core_type_size(struct upid));
	return up;
}

static __always_inline __u32 as_tgid_at(struct task_struct *t, __u32 level)
{
	struct pid *pid = as_cast(t, struct task_struct)->group_leader->thread_pid;

	if (!pid || level > pid->level)
		return 0;
	return as_upid_at(pid, level).nr;
}

/* Depth of the task's own pid namespace (0: the host's). */
static __always_inline __u32 as_pid_level(struct task_struct *t)
{
	return as_cast(t, struct task_struct)->group_leader->thread_pid->level;
}

#endif /* __AS_COMPAT_BPF_H */
