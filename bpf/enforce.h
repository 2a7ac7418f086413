/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Enforcement map contract: keys and values of the maps enforcer/compiler.py
 * fills and bpf/netblock.bpf.c and bpf/lsm.bpf.c read. enforcer/compiler.py is
 * the only Python mirror (struct formats next to each name there).
 *
 * Every rule key carries (cgroup_id, gen). A workload's header entry in as_wl
 * names the generation in force; an update writes the whole next generation,
 * flips the header (one atomic element update), then deletes the old
 * generation. The kernel therefore always sees one complete rule set.
 *
 * No kernel headers: include after vmlinux.h (BPF side) or armorstream.h.
 */
#ifndef __ARMORSTREAM_ENFORCE_H
#define __ARMORSTREAM_ENFORCE_H

#include "armorstream.h"

#define AS_MAX_WORKLOADS 4096
#define AS_MAX_FP_RULES 16384
#define AS_MAX_NET_RULES 8192
#define AS_MAX_CAP_RULES 8192
#define AS_MAX_DIR_DEPTH 16 /* ancestor directories the LSM walks */

/* as_wl_val.flags */
enum as_wl_flag {
	AS_WL_ALLOW_PROC = 1 << 0,  /* an Allow process rule exists: allow-list mode */
	AS_WL_ALLOW_FILE = 1 << 1,
	AS_WL_ALLOW_NET = 1 << 2,
	AS_WL_ALLOW_CAP = 1 << 3,
	AS_WL_POSTURE_FILE_BLOCK = 1 << 4, /* process rules follow the file posture */
	AS_WL_POSTURE_NET_BLOCK = 1 << 5,
	AS_WL_POSTURE_CAP_BLOCK = 1 << 6,
	AS_WL_USER_PROC = 1 << 7,   /* rules the kernel cannot express: user space decides */
	AS_WL_USER_FILE = 1 << 8,
};

/* Rule variants (as_rule_val.variants): action x (plain, ownerOnly, readOnly,
 * both). A variant is "violated" by an access: plain Block/Audit always, plain
 * Allow never; ownerOnly by a non-owner; readOnly by a write; both by either. */
enum as_variant {
	AS_V_BLOCK_ANY = 1 << 0,
	AS_V_BLOCK_NONOWNER = 1 << 1,          /* ownerOnly */
	AS_V_BLOCK_WRITE = 1 << 2,             /* readOnly */
	AS_V_BLOCK_NONOWNER_OR_WRITE = 1 << 3, /* ownerOnly + readOnly */
	AS_V_AUDIT_ANY = 1 << 4,
	AS_V_AUDIT_NONOWNER = 1 << 5,
	AS_V_AUDIT_WRITE = 1 << 6,
	AS_V_AUDIT_NONOWNER_OR_WRITE = 1 << 7,
	AS_V_ALLOW_ANY = 1 << 8,
	AS_V_ALLOW_OWNER = 1 << 9,
	AS_V_ALLOW_READ = 1 << 10,
	AS_V_ALLOW_OWNER_READ = 1 << 11,
};

enum as_fp_kind {
	AS_FP_PROCESS = 1,  /* path of the executed binary */
	AS_FP_FILE = 2,     /* path of the opened file */
	AS_FP_EXECNAME = 3, /* base name of the executed binary */
};

/* as_fp_key.scope */
enum as_scope {
	AS_SCOPE_EXACT = 0, /* this very path (or base name) */
	AS_SCOPE_CHILD = 1, /* directory: its direct children, and itself */
	AS_SCOPE_TREE = 2,  /* directory: everything below it, and itself; carries AS_RV_HINT */
};

/* as_rule_val.flags */
enum as_rv_flag {
	AS_RV_HINT = 1 << 0, /* some directory rule lies at or below this directory */
};

enum as_proto {
	AS_PROTO_TCP = 1,
	AS_PROTO_UDP = 2,
	AS_PROTO_ICMP = 3,
	AS_PROTO_ICMPV6 = 4,
	AS_PROTO_RAW = 5,
	AS_PROTO_SCTP = 6,
};

struct as_wl_val {
	__u32 gen;
	__u32 flags; /* enum as_wl_flag */
};

struct as_fp_key {
	__u64 cgroup_id;
	__u32 gen;
	__u16 kind;  /* enum as_fp_kind */
	__u8 scope;  /* enum as_scope */
	__u8 _pad0;
	char path[AS_PATH_LEN];   /* file, directory (ends in '/') or base name */
	char source[AS_PATH_LEN]; /* fromSource binary; empty for any source */
};

/* Value of every rule map. rule[i] is the first rule (1-based, in policy order)
 * that set variant bit i, so an alert names the rule the matcher would name. */
struct as_rule_val {
	__u16 variants; /* enum as_variant */
	__u16 flags;    /* enum as_rv_flag */
	__u32 _pad0;
	__u32 rule[12];
};

struct as_net_key {
	__u64 cgroup_id;
	__u32 gen;
	__u32 proto; /* enum as_proto */
};

struct as_cap_key {
	__u64 cgroup_id;
	__u32 gen;
	__u32 cap; /* CAP_* number */
};


AS_STATIC_ASSERT(sizeof(struct as_wl_val) == 8, "as_wl_val layout changed");
AS_STATIC_ASSERT(sizeof(struct as_fp_key) == 528, "as_fp_key layout changed");
AS_STATIC_ASSERT(sizeof(struct as_rule_val) == 56, "as_rule_val layout changed");
AS_STATIC_ASSERT(sizeof(struct as_net_key) == 16, "as_net_key layout changed");
AS_STATIC_ASSERT(sizeof(struct as_cap_key) == 16, "as_cap_key layout changed");

#endif /* __ARMORSTREAM_ENFORCE_H */
