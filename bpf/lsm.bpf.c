// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * BPF-LSM enforcement, the production path: exec (bprm_check_security), file
 * open, socket create/connect/bind/listen/accept and capable, decided from the
 * compiled maps of enforce.h, keyed by the current cgroup v2 id. A denial
 * returns -EPERM and emits a record with AS_F_BLOCKED into as_enf_events.
 *
 * Needs BPF trampolines (refused on some VMs: see docs/enforcement.md); the
 * tests run it in a qemu guest (tests/vm). The decision is _resolve() of
 * enforcer/compiler.py: exact keys, then ancestors top-down while hinted.
 *
 * exec and open use the sleepable hooks (lsm.s/) because bpf_d_path is only
 * allowed there.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#define AS_ENF_SOURCE AS_F_ENF_BPFLSM
#include "enforce.bpf.h"

#define AS_EPERM 1
#define AS_FMODE_WRITE 0x2
#define AS_FMODE_EXEC 0x20
#define AS_O_FMODE_EXEC 0x20 /* __FMODE_EXEC in f_flags */
#define AS_NSRC 3 /* keys per lookup: any source, the acting binary, its parent's binary */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AS_MAX_FP_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct as_fp_key);
	__type(value, struct as_rule_val);
} as_fp_rules SEC(".maps");

/* Per-CPU work area: keys are too big for the 512-byte stack. */
struct as_scratch {
	struct as_fp_key k[AS_NSRC];
	char path[AS_PATH_LEN];
	char src[AS_NSRC - 1][AS_PATH_LEN];
	struct as_hits h;
	__u32 last_slash;
	__u32 nsrc;
	__u32 stop;
	__u32 itself; /* the path itself as a directory ("/etc" matches "/etc/" rules) */
	__u16 viol;
	__u16 kind;
	__u8 ended[AS_NSRC];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct as_scratch);
} as_enf_scratch SEC(".maps");

static __always_inline struct as_scratch *as_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&as_enf_scratch, &zero);
}

static __always_inline void as_lookup_keys(struct as_scratch *s, __u8 scope)
{
	struct as_rule_val *v;
	int i;

#pragma unroll
	for (i = 0; i < AS_NSRC; i++) {
		if (i >= s->nsrc)
			break;
		s->k[i].scope = scope;
		v = bpf_map_lookup_elem(&as_fp_rules, &s->k[i]);
		if (v)
			as_hit(&s->h, v, i > 0, s->viol);
	}
}

/* bpf_loop bodies find the per-CPU scratch themselves: 6.1 takes only a stack
 * pointer as the loop context. */

/* bpf_loop body: extend the key paths by one character; at each '/', look the
 * prefix up as a directory, and stop at the first prefix without a hint. */
static long as_walk_step(__u32 j, void *ctx)
{
	struct as_scratch *s = as_scratch();
	char c;
	int i;

	if (!s)
		return 1;

	j &= AS_PATH_LEN - 1;
	c = s->path[j];
	if (!c) {
		/* End of the path: the path itself as a directory. */
		if (j == 0)
			return 1;
		c = '/';
		s->itself = 1;
	}
#pragma unroll
	for (i = 0; i < AS_NSRC; i++)
		s->k[i].path[j] = c;
	if (c != '/')
		return 0;
	s->k[0].scope = AS_SCOPE_TREE;
	if (!bpf_map_lookup_elem(&as_fp_rules, &s->k[0]))
		return 1; /* no hint: no directory rule at or below this prefix */
	as_lookup_keys(s, AS_SCOPE_TREE);
	if (s->itself || j == s->last_slash)
		as_lookup_keys(s, AS_SCOPE_CHILD);
	return s->itself ? 1 : 0;
}

static long as_basename_step(__u32 j, void *ctx)
{
	struct as_scratch *s = as_scratch();
	__u32 from;
	char c;
	int i;

	if (!s)
		return 1;
	from = (s->last_slash + 1 + j) & (AS_PATH_LEN - 1);
	c = s->path[from];
	j &= AS_PATH_LEN - 1;
#pragma unroll
	for (i = 0; i < AS_NSRC; i++)
		s->k[i].path[j] = c;
	return c ? 0 : 1;
}

/* bpf_d_path leaves bytes of its work after the NUL; hash keys need zeros there. */
static long as_zero_tail_step(__u32 j, void *ctx)
{
	struct as_scratch *s = as_scratch();
	char *buf;
	int b;

	if (!s)
		return 1;
	j &= AS_PATH_LEN - 1;
#pragma unroll
	for (b = 0; b < AS_NSRC; b++) {
		buf = b == 0 ? s->path : s->src[(b - 1) & 1];
		if (s->ended[b])
			buf[j] = 0;
		else if (!buf[j])
			s->ended[b] = 1;
	}
	return 0;
}

static long as_slash_step(__u32 j, void *ctx)
{
	struct as_scratch *s = as_scratch();
	char c;

	if (!s)
		return 1;
	c = s->path[j & (AS_PATH_LEN - 1)];
	if (!c)
		return 1;
	if (c == '/')
		s->last_slash = j & (AS_PATH_LEN - 1);
	return 0;
}

static __always_inline void as_clear_paths(struct as_scratch *s)
{
	int i;

#pragma unroll
	for (i = 0; i < AS_NSRC; i++)
		__builtin_memset(s->k[i].path, 0, AS_PATH_LEN);
}

/* Process/file decision over s->path for the workload; the caller filled s->src[]. */
static __always_inline struct as_verdict as_fp_decide(struct as_scratch *s, __u64 cgid,
						       const struct as_wl_val *wl, __u16 kind, int owner,
						       int write)
{
	int i;

	__builtin_memset(&s->h, 0, sizeof(s->h));
	s->viol = as_violated_mask(owner, write);
	s->kind = kind;
	s->itself = 0;
	s->last_slash = 0;
	__builtin_memset(s->ended, 0, sizeof(s->ended));
	bpf_loop(AS_PATH_LEN, as_zero_tail_step, 0, 0);
#pragma unroll
	for (i = 0; i < AS_NSRC; i++) {
		s->k[i].cgroup_id = cgid;
		s->k[i].gen = wl->gen;
		s->k[i].kind = kind;
		s->k[i]._pad0 = 0;
		if (i == 0)
			__builtin_memset(s->k[i].source, 0, AS_PATH_LEN);
		else
			__builtin_memcpy(s->k[i].source, s->src[i - 1], AS_PATH_LEN);
		__builtin_memcpy(s->k[i].path, s->path, AS_PATH_LEN);
	}
	as_lookup_keys(s, AS_SCOPE_EXACT);
	bpf_loop(AS_PATH_LEN, as_slash_step, 0, 0);
	if (kind == AS_FP_PROCESS) {
		as_clear_paths(s);
#pragma unroll
		for (i = 0; i < AS_NSRC; i++)
			s->k[i].kind = AS_FP_EXECNAME;
		bpf_loop(AS_PATH_LEN, as_basename_step, 0, 0);
		as_lookup_keys(s, AS_SCOPE_EXACT);
#pragma unroll
		for (i = 0; i < AS_NSRC; i++)
			s->k[i].kind = kind;
	}
	as_clear_paths(s);
	bpf_loop(AS_PATH_LEN, as_walk_step, 0, 0);
	return as_resolve(&s->h, !!(wl->flags & (kind == AS_FP_PROCESS ? AS_WL_ALLOW_PROC : AS_WL_ALLOW_FILE)),
			  !!(wl->flags & (AS_WL_ALLOW_PROC | AS_WL_ALLOW_FILE)),
			  !!(wl->flags & AS_WL_POSTURE_FILE_BLOCK));
}

/* Fill s->src[0] (the acting binary) and s->src[1] (its parent's binary). */
/* (f_path is const in newer kernels; bpf_d_path takes it non-const.) */
static __always_inline void as_sources(struct as_scratch *s)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct file *exe;

	__builtin_memset(s->src[0], 0, AS_PATH_LEN);
	__builtin_memset(s->src[1], 0, AS_PATH_LEN);
	exe = task->mm ? task->mm->exe_file : 0;
	if (exe)
		bpf_d_path((struct path *)&exe->f_path, s->src[0], AS_PATH_LEN);
	exe = (task->real_parent && task->real_parent->mm) ? task->real_parent->mm->exe_file : 0;
	if (exe)
		bpf_d_path((struct path *)&exe->f_path, s->src[1], AS_PATH_LEN);
	s->nsrc = AS_NSRC;
}

static __always_inline int as_owner(struct inode *inode)
{
	return (__u32)bpf_get_current_uid_gid() == BPF_CORE_READ(inode, i_uid.val);
}

SEC("lsm.s/bprm_check_security")
int BPF_PROG(as_bprm_check, struct linux_binprm *bprm, int ret)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	struct as_wl_val *wl = bpf_map_lookup_elem(&as_wl, &cgid);
	struct as_exec_rec *r;
	struct as_scratch *s;
	struct as_verdict v;

	if (ret || !wl || (wl->flags & AS_WL_USER_PROC))
		return ret;
	s = as_scratch();
	if (!s)
		return 0;
	__builtin_memset(s->path, 0, AS_PATH_LEN);
	bpf_d_path((struct path *)&bprm->file->f_path, s->path, AS_PATH_LEN);
	as_sources(s);
	/* The matcher counts the new binary as a source too (its ProcessName): it
	 * replaces the parent's binary here, since keys hold three sources. */
	__builtin_memcpy(s->src[1], s->path, AS_PATH_LEN);
	v = as_fp_decide(s, cgid, wl, AS_FP_PROCESS, as_owner(bprm->file->f_inode), 0);
	if (v.flags) {
		r = as_reserve(&as_enf_events, sizeof(*r), AS_KIND_EXEC);
		if (r) {
			as_fill_hdr(&r->hdr, AS_KIND_EXEC, sizeof(*r), cgid, v.deny ? -AS_EPERM : 0, v.flags);
			r->exe_ino = BPF_CORE_READ(bprm, file, f_inode, i_ino);
			r->exe_uid = BPF_CORE_READ(bprm, file, f_inode, i_uid.val);
			r->argc = v.rule; /* the deciding rule id (no argv at this point) */
			r->args_len = 0;
			r->_pad0 = 0;
			__builtin_memset(r->parent_comm, 0, AS_COMM_LEN);
			r->cwd[0] = 0;
			r->args[0] = 0;
			__builtin_memcpy(r->path, s->path, AS_PATH_LEN);
			bpf_ringbuf_submit(r, 0);
		}
	}
	return v.deny ? -AS_EPERM : 0;
}

SEC("lsm.s/file_open")
int BPF_PROG(as_file_open, struct file *file, int ret)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	struct as_wl_val *wl = bpf_map_lookup_elem(&as_wl, &cgid);
	struct as_file_rec *r;
	struct as_scratch *s;
	struct as_verdict v;
	__u32 fmode;

	if (ret || !wl || (wl->flags & AS_WL_USER_FILE))
		return ret;
	fmode = file->f_mode;
	/* The exec's own opens (the binary, its interpreter) are judged by
	 * bprm_check_security. Before 6.x moved it into f_mode, only f_flags had the bit. */
	if ((fmode & AS_FMODE_EXEC) || (file->f_flags & AS_O_FMODE_EXEC))
		return 0;
	s = as_scratch();
	if (!s)
		return 0;
	__builtin_memset(s->path, 0, AS_PATH_LEN);
	bpf_d_path((struct path *)&file->f_path, s->path, AS_PATH_LEN);
	as_sources(s);
	v = as_fp_decide(s, cgid, wl, AS_FP_FILE, as_owner(file->f_inode), !!(fmode & AS_FMODE_WRITE));
	if (v.flags) {
		r = as_reserve(&as_enf_events, sizeof(*r), AS_KIND_FILE);
		if (r) {
			as_fill_hdr(&r->hdr, AS_KIND_FILE, sizeof(*r), cgid, v.deny ? -AS_EPERM : 0, v.flags);
			r->open_flags = file->f_flags;
			r->mode = fmode;
			r->ino = file->f_inode->i_ino;
			r->dev = file->f_inode->i_sb->s_dev;
			r->owner_uid = file->f_inode->i_uid.val;
			__builtin_memcpy(r->path, s->path, AS_PATH_LEN);
			bpf_ringbuf_submit(r, 0);
		}
	}
	return v.deny ? -AS_EPERM : 0;
}

static __always_inline int as_sock_op(struct socket *sock, __u16 op)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u16 family = BPF_CORE_READ(sock, sk, __sk_common.skc_family);
	__u16 type = BPF_CORE_READ(sock, type);
	__u16 protocol = BPF_CORE_READ(sock, sk, sk_protocol);
	struct as_verdict v = as_net_decide(cgid, family, type, protocol);

	as_net_report(cgid, v, op, family, type, protocol, 0, 0, 0);
	return v.deny ? -AS_EPERM : 0;
}

SEC("lsm/socket_create")
int BPF_PROG(as_socket_create, int family, int type, int protocol, int kern, int ret)
{
	__u64 cgid;
	struct as_verdict v;

	if (ret || kern)
		return ret;
	cgid = bpf_get_current_cgroup_id();
	v = as_net_decide(cgid, family, type, protocol);
	as_net_report(cgid, v, AS_NET_SOCKET, family, type, protocol, 0, 0, 0);
	return v.deny ? -AS_EPERM : 0;
}

SEC("lsm/socket_connect")
int BPF_PROG(as_socket_connect, struct socket *sock, struct sockaddr *address, int addrlen, int ret)
{
	return ret ? ret : as_sock_op(sock, AS_NET_CONNECT);
}

SEC("lsm/socket_bind")
int BPF_PROG(as_socket_bind, struct socket *sock, struct sockaddr *address, int addrlen, int ret)
{
	return ret ? ret : as_sock_op(sock, AS_NET_BIND);
}

SEC("lsm/socket_listen")
int BPF_PROG(as_socket_listen, struct socket *sock, int backlog, int ret)
{
	return ret ? ret : as_sock_op(sock, AS_NET_LISTEN);
}

SEC("lsm/socket_accept")
int BPF_PROG(as_socket_accept, struct socket *sock, struct socket *newsock, int ret)
{
	return ret ? ret : as_sock_op(sock, AS_NET_ACCEPT);
}

SEC("lsm/capable")
int BPF_PROG(as_capable, const struct cred *cred, struct user_namespace *ns, int cap, unsigned int opts,
	     int ret)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	struct as_wl_val *wl;
	struct as_cap_key k = {};
	struct as_rule_val *rv;
	struct as_hits h = {};
	struct as_verdict v;
	struct as_cap_rec *r;

	if (ret)
		return ret;
	wl = bpf_map_lookup_elem(&as_wl, &cgid);
	if (!wl)
		return 0;
	k.cgroup_id = cgid;
	k.gen = wl->gen;
	k.cap = cap;
	rv = bpf_map_lookup_elem(&as_cap_rules, &k);
	if (rv)
		as_hit(&h, rv, 0, as_violated_mask(1, 0));
	v = as_resolve(&h, !!(wl->flags & AS_WL_ALLOW_CAP), !!(wl->flags & AS_WL_ALLOW_CAP),
		       !!(wl->flags & AS_WL_POSTURE_CAP_BLOCK));
	if (v.flags) {
		r = as_reserve(&as_enf_events, sizeof(*r), AS_KIND_CAP);
		if (r) {
			as_fill_hdr(&r->hdr, AS_KIND_CAP, sizeof(*r), cgid, v.deny ? -AS_EPERM : 0, v.flags);
			r->cap = cap;
			r->syscall = v.rule; /* the deciding rule id */
			bpf_ringbuf_submit(r, 0);
		}
	}
	return v.deny ? -AS_EPERM : 0;
}

char LICENSE[] SEC("license") = "GPL";
