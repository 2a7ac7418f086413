/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * How the monitors (path.bpf.h, record.bpf.h, file.bpf.c) read kernel structs. Each
 * monitor is built twice from one source: %.bpf.o with plain loads (Linux 6.2+), and
 * %.portable.bpf.o (-DAS_PORTABLE) with one bpf_probe_read_kernel per field, which the
 * sensor loads when the kernel refuses the first (sensor/monitors.py). The enforcement
 * objects, which also load in the 6.1 guest kernel of tests/vm, use neither.
 */
#ifndef __AS_CAST_BPF_H
#define __AS_CAST_BPF_H

#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>

#ifdef AS_PORTABLE

#define AS_PTR(p, type) ((type *)(p))
#define AS_UNTYPED(p) ((const char *)(p))
#define AS_READ(...) BPF_CORE_READ(__VA_ARGS__)

#else

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
#define AS_PTR(p, type) as_cast(p, type)
#define AS_UNTYPED(p) as_untyped(p)
/* AS_READ(src, a, b.c) is src->a->b.c, as BPF_CORE_READ(src, a, b.c) reads it */
#define AS_READ(src, ...) ___arrow(as_cast(src, typeof(*(src))), __VA_ARGS__)

#endif

/* numbers[level] of `pid` (numbers[] is indexed by a variable: read through an untyped pointer). */
static __always_inline struct upid as_upid_at(struct pid *pid, __u32 level)
{
	struct upid up = {};

	bpf_probe_read_kernel(&up, sizeof(up), AS_UNTYPED(pid) + bpf_core_field_offset(struct pid, numbers) +
						       (level & 31) * bpf_core_type_size(struct upid));
	return up;
}

/* The thread group leader's pid number at pid-namespace `level` (as compat.bpf.h's as_tgid_at). */
static __always_inline __u32 as_tgid_at_fast(struct task_struct *task, __u32 level)
{
	struct pid *pid = AS_READ(task, group_leader, thread_pid);

	if (!pid || level > AS_READ(pid, level))
		return 0;
	return as_upid_at(pid, level).nr;
}

#endif /* __AS_CAST_BPF_H */
