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
 * task_struct::thread_pid replaced pids[PIDTYPE_PID].pid in 4.19 (commit
 * 2c4704756cab, "pids: Move the pgrp and session pid pointers from task_struct to
 * signal_struct"). armorstream needs ring buffers (5.8), so only the new form is read.
 *
 * Returns the thread group leader's pid number at pid-namespace `level`, or 0 when
 * the task is not visible there (a parent outside the container's namespace).
 */
static __always_inline __u32 as_tgid_at(struct task_struct *t, __u32 level)
{
	struct pid *pid = BPF_CORE_READ(t, group_leader, thread_pid);
	struct upid up = {};

	if (!pid || level > BPF_CORE_READ(pid, level))
		return 0;
	bpf_core_read(&up, sizeof(up), &pid->numbers[level]);
	return up.nr;
}

/* Depth of the task's own pid namespace (0: the host's). */
static __always_inline __u32 as_pid_level(struct task_struct *t)
{
	return BPF_CORE_READ(t, group_leader, thread_pid, level);
}

#endif /* __AS_COMPAT_BPF_H */
