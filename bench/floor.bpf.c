// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * The floor of bench/sensor_overhead.py: programs that do nothing, on the hooks the
 * sensor's process and file monitors use (bpf/process.bpf.c, bpf/file.bpf.c). Attaching
 * any syscall tracepoint moves every task's syscalls onto the kernel's traced slow path
 * (TIF_SYSCALL_TRACEPOINT) before a program can look at the cgroup; this measures that
 * price, which no filter inside the program can avoid.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define NOOP(sec, name)          \
	SEC(sec)                 \
	int name(void *ctx)      \
	{                        \
		return 0;        \
	}

NOOP("tp_btf/sched_process_exec", floor_exec)
NOOP("tp_btf/sched_process_fork", floor_fork)
NOOP("tp_btf/sched_process_exit", floor_exit)
NOOP("tracepoint/syscalls/sys_enter_open", floor_enter_open)
NOOP("tracepoint/syscalls/sys_enter_creat", floor_enter_creat)
NOOP("tracepoint/syscalls/sys_enter_openat", floor_enter_openat)
NOOP("tracepoint/syscalls/sys_enter_openat2", floor_enter_openat2)
NOOP("tracepoint/syscalls/sys_exit_open", floor_exit_open)
NOOP("tracepoint/syscalls/sys_exit_creat", floor_exit_creat)
NOOP("tracepoint/syscalls/sys_exit_openat", floor_exit_openat)
NOOP("tracepoint/syscalls/sys_exit_openat2", floor_exit_openat2)

char LICENSE[] SEC("license") = "Dual BSD/GPL";
