/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Maps shared by every armorstream object, and the helpers that use them. Each
 * object declares its own copy; the sensor pins them by name in one directory, so
 * libbpf reuses one map for all objects (and across sensor restarts).
 */
#ifndef __AS_MAPS_BPF_H
#define __AS_MAPS_BPF_H

#include "armorstream.h"

#define AS_MAX_WATCHED 16384
#define AS_KIND_SLOTS 16 /* > every enum as_kind value */

/* Watched workloads: cgroup v2 id -> enum as_visibility bits. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AS_MAX_WATCHED);
	__type(key, __u64);
	__type(value, __u32);
} as_watched SEC(".maps");

/* Records the kernel could not reserve (ring buffer full), per CPU, by record kind. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AS_KIND_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} as_drops SEC(".maps");

/* Look up `key`, inserting `init` first if absent; a racing CPU's insert (-EEXIST) is fine. */
static __always_inline void *bpf_map_lookup_or_try_init(void *map, const void *key, const void *init)
{
	void *val = bpf_map_lookup_elem(map, key);
	if (val)
		return val;
	long err = bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	if (err && err != -17 /* EEXIST */)
		return 0;
	return bpf_map_lookup_elem(map, key);
}

/* Reserve a record in `rb`; a failure is counted in as_drops under its kind. */
static __always_inline void *as_reserve(void *rb, __u32 size, __u32 kind)
{
	void *rec = bpf_ringbuf_reserve(rb, size, 0);
	if (!rec) {
		__u64 *n = bpf_map_lookup_elem(&as_drops, &kind);
		if (n)
			*n += 1; /* per-CPU slot: no atomics needed */
	}
	return rec;
}

#endif /* __AS_MAPS_BPF_H */
