/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Enforcement maps and the decision both enforcement objects share
 * (netblock.bpf.c: cgroup hooks; lsm.bpf.c: BPF-LSM). The sensor pins every map
 * by name in one directory, so both objects and every sensor restart use the
 * same maps. The decision mirrors _resolve() in enforcer/compiler.py.
 */
#ifndef __AS_ENFORCE_BPF_H
#define __AS_ENFORCE_BPF_H

#include "enforce.h"
#include "maps.bpf.h"
#include "compat.bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AS_MAX_WORKLOADS);
	__type(key, __u64);
	__type(value, struct as_wl_val);
} as_wl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AS_MAX_NET_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct as_net_key);
	__type(value, struct as_rule_val);
} as_net_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AS_MAX_CAP_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct as_cap_key);
	__type(value, struct as_rule_val);
} as_cap_rules SEC(".maps");

/* Each object that includes this header names itself: AS_F_ENF_BPFLSM or AS_F_ENF_CGROUP. */
#ifndef AS_ENF_SOURCE
#error "define AS_ENF_SOURCE (an AS_F_ENF_* flag) before including enforce.bpf.h"
#endif

/* Denials and audits of the fast path, as ordinary records with AS_F_BLOCKED/AUDITED. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} as_enf_events SEC(".maps");

#define AS_BLOCK_BITS 0x00f
#define AS_AUDIT_BITS 0x0f0
#define AS_ALLOW_BITS 0xf00

/* What one decision came to. */
struct as_verdict {
	int deny;      /* 1: refuse the operation */
	__u32 flags;   /* AS_F_BLOCKED / AS_F_AUDITED / AS_F_POSTURE, 0: nothing to report */
	__u32 rule;    /* deciding rule id (1-based), 0 for posture */
};

/* Variant bits an access violates (enforcer/compiler.py _violated): plain Block
 * and Audit always, plain Allow never; ownerOnly by a non-owner; readOnly by a
 * write; both by either. */
static __always_inline __u16 as_violated_mask(int owner, int write)
{
	__u16 low = 0x1; /* plain */
	if (!owner)
		low |= 0x2;
	if (write)
		low |= 0x4;
	if (!owner || write)
		low |= 0x8;
	return (low | (low << 4) | ((low & 0xe) << 8));
}

/* Accumulates hits, then resolves them as matcher rules P1-P6 do. */
struct as_hits {
	__u16 any;        /* every variant bit seen */
	__u16 from;       /* bits seen through a fromSource key */
	__u32 block_rule[2]; /* [0] any tier, [1] fromSource tier: min violated Block rule */
	__u32 allow_rule[2];
	__u32 audit_rule;
	__u16 refused[2];
};

static __always_inline __u32 as_min_rule(__u32 cur, __u32 r)
{
	return (r && (!cur || r < cur)) ? r : cur;
}

static __always_inline void as_hit(struct as_hits *h, const struct as_rule_val *v, int from, __u16 viol)
{
	__u16 bits = v->variants;
	int t = from ? 1 : 0;
	int i;

	if (!bits)
		return;
	h->any |= bits;
	if (from)
		h->from |= bits;
#pragma unroll
	for (i = 0; i < 12; i++) {
		__u16 b = 1 << i;
		if (!(bits & b))
			continue;
		if (b & AS_BLOCK_BITS) {
			if (viol & b)
				h->block_rule[t] = as_min_rule(h->block_rule[t], v->rule[i]) ?: 0xffffffff;
		} else if (b & AS_AUDIT_BITS) {
			if (viol & b)
				h->audit_rule = as_min_rule(h->audit_rule, v->rule[i]) ?: 0xffffffff;
		} else {
			if (viol & b)
				h->refused[t] = 1;
			else
				h->allow_rule[t] = as_min_rule(h->allow_rule[t], v->rule[i]) ?: 0xffffffff;
		}
	}
}

static __always_inline struct as_verdict as_resolve(const struct as_hits *h, int allow_mode,
						    int audit_allow_mode, int posture_block)
{
	struct as_verdict v = {};
	/* P2: the fromSource tier, when it has an enforcing (Block/Allow) hit. */
	int t = (h->from & (AS_BLOCK_BITS | AS_ALLOW_BITS)) ? 1 : 0;
	int tier = t ? 1 : ((h->any & (AS_BLOCK_BITS | AS_ALLOW_BITS)) ? 1 : 0);
	/* Outside the fromSource tier, source hits only ever carry Audit bits. */
	__u32 block = t ? h->block_rule[1] : h->block_rule[0];
	__u32 allow = t ? h->allow_rule[1] : h->allow_rule[0];
	int refused = t ? h->refused[1] : h->refused[0];
	if (block) {
		v.deny = 1;
		v.flags = AS_F_BLOCKED;
		v.rule = block;
		return v;
	}
	if (!allow && (refused || (!tier && allow_mode && posture_block))) {
		v.deny = 1;
		v.flags = AS_F_BLOCKED | AS_F_POSTURE;
		return v;
	}
	if (h->audit_rule) {
		v.flags = AS_F_AUDITED;
		v.rule = h->audit_rule;
		return v;
	}
	if (!allow && !tier && audit_allow_mode && !posture_block)
		v.flags = AS_F_AUDITED | AS_F_POSTURE;
	return v;
}

/* Fill the common header of a record about the current task. */
static __always_inline void as_fill_hdr(struct as_hdr *hdr, __u16 kind, __u32 size, __u64 cgid,
					 int ret, __u32 flags)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();
	__u32 level = as_pid_level(task);

	hdr->kind = kind;
	hdr->version = AS_SCHEMA_VERSION;
	hdr->size = size;
	hdr->ktime_ns = as_boot_ns();
	hdr->cgroup_id = cgid;
	hdr->pid_ns = BPF_CORE_READ(task, nsproxy, pid_ns_for_children, ns.inum);
	hdr->mnt_ns = BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);
	hdr->host_pid = pid_tgid >> 32;
	hdr->host_ppid = BPF_CORE_READ(task, real_parent, tgid);
	hdr->pid = as_tgid_at(task, level);
	hdr->ppid = as_tgid_at(BPF_CORE_READ(task, real_parent), level);
	hdr->uid = (__u32)uid_gid;
	hdr->gid = uid_gid >> 32;
	hdr->ret = ret;
	/* A decided record names its backend, so the alert's Enforcer field can. */
	if (flags & (AS_F_BLOCKED | AS_F_AUDITED))
		flags |= AS_ENF_SOURCE;
	hdr->flags = flags | (level == 0 ? AS_F_HOST : 0);
	bpf_get_current_comm(hdr->comm, sizeof(hdr->comm));
}

/* Protocol classes of a socket (socket_protos() in enforcer/compiler.py): *p0 names
 * the protocol (0: none), *p1 is AS_PROTO_RAW for raw sockets (0: not raw). */
static __always_inline void as_socket_protos(__u32 family, __u32 type, __u32 protocol, __u32 *p0,
					     __u32 *p1)
{
	__u32 a = 0;

	*p0 = 0;
	*p1 = 0;
	if (family != 2 /* AF_INET */ && family != 10 /* AF_INET6 */)
		return;
	type &= 0xf;
	if (protocol == 6)
		a = AS_PROTO_TCP;
	else if (protocol == 17)
		a = AS_PROTO_UDP;
	else if (protocol == 1)
		a = AS_PROTO_ICMP;
	else if (protocol == 58)
		a = AS_PROTO_ICMPV6;
	else if (protocol == 132)
		a = AS_PROTO_SCTP;
	else if (protocol == 0 && type == 1 /* SOCK_STREAM */)
		a = AS_PROTO_TCP;
	else if (protocol == 0 && type == 2 /* SOCK_DGRAM */)
		a = AS_PROTO_UDP;
	*p0 = a;
	if (type == 3 /* SOCK_RAW */)
		*p1 = AS_PROTO_RAW;
}

static __always_inline void as_net_hit(struct as_hits *h, __u64 cgid, __u32 gen, __u32 proto)
{
	struct as_net_key k = {.cgroup_id = cgid, .gen = gen, .proto = proto};
	struct as_rule_val *v;

	if (!proto)
		return;
	v = bpf_map_lookup_elem(&as_net_rules, &k);
	if (v)
		as_hit(h, v, 0, as_violated_mask(1, 0));
}

/* Network decision for the current task's workload (v.flags: whether to report). */
static __always_inline struct as_verdict as_net_decide(__u64 cgid, __u32 family, __u32 type,
							__u32 protocol)
{
	struct as_verdict none = {};
	struct as_hits h = {};
	struct as_wl_val *wl = bpf_map_lookup_elem(&as_wl, &cgid);
	__u32 p0, p1;

	if (!wl)
		return none;
	as_socket_protos(family, type, protocol, &p0, &p1);
	if (!p0 && !p1)
		return none;
	as_net_hit(&h, cgid, wl->gen, p0);
	as_net_hit(&h, cgid, wl->gen, p1);
	return as_resolve(&h, !!(wl->flags & AS_WL_ALLOW_NET), !!(wl->flags & AS_WL_ALLOW_NET),
			  !!(wl->flags & AS_WL_POSTURE_NET_BLOCK));
}

/* Emit an as_net_rec for a decision worth reporting (rule id in the fd field's place is
 * not kept: user space re-derives PolicyName with the matcher). */
static __always_inline void as_net_report(__u64 cgid, struct as_verdict v, __u16 op, __u16 family,
					   __u16 type, __u16 protocol, __u16 dport, const __u32 *daddr,
					   int addr_words)
{
	struct as_net_rec *r;
	int i;

	if (!v.flags)
		return;
	r = as_reserve(&as_enf_events, sizeof(*r), AS_KIND_NET);
	if (!r)
		return;
	as_fill_hdr(&r->hdr, AS_KIND_NET, sizeof(*r), cgid, v.deny ? -1 /* EPERM */ : 0, v.flags);
	r->op = op;
	r->family = family;
	r->type = type;
	r->protocol = protocol;
	r->sport = 0;
	r->dport = dport;
	r->fd = (__s32)v.rule; /* the kernel has no fd yet: carries the deciding rule id */
	__builtin_memset(r->saddr, 0, sizeof(r->saddr));
	__builtin_memset(r->daddr, 0, sizeof(r->daddr));
#pragma unroll
	for (i = 0; i < 4; i++) {
		if (i < addr_words && daddr)
			__builtin_memcpy(r->daddr + 4 * i, &daddr[i], 4);
	}
	bpf_ringbuf_submit(r, 0);
}

#endif /* __AS_ENFORCE_BPF_H */
