// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Process monitor: exec (path, argv, cwd, parent), fork and exit records into one
 * ring buffer, as_proc_rb. Only tasks in a watched cgroup (as_watched) or, when
 * as_host_visible has AS_VIS_PROCESS set, host tasks produce anything; every other
 * task pays one hash lookup.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "armorstream.h"
#include "compat.bpf.h"
#include "maps.bpf.h"

#define AS_MAX_DEPTH 40 /* path components walked before giving up (AS_F_TRUNC_PATH) */

/* enum as_visibility bits for host tasks; set by the sensor before load. */
const volatile __u32 as_host_visible = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} as_proc_rb SEC(".maps");

/* Paths are built backwards from the leaf; twice AS_PATH_LEN keeps every bounded
 * write inside the buffer for the verifier. */
struct as_scratch {
	char buf[AS_PATH_LEN * 2];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct as_scratch);
} as_proc_scratch SEC(".maps");

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
static __always_inline void as_fill_hdr(struct as_hdr *h, struct task_struct *t, __u16 kind, __u32 size,
					__u64 cgid, __u32 flags)
{
	struct task_struct *parent = BPF_CORE_READ(t, real_parent);
	__u32 level = as_pid_level(t);
	struct pid *pid = BPF_CORE_READ(t, group_leader, thread_pid);
	struct upid up = {};
	__u64 ugid = bpf_get_current_uid_gid();

	bpf_core_read(&up, sizeof(up), &pid->numbers[level & 31]);
	h->kind = kind;
	h->version = AS_SCHEMA_VERSION;
	h->size = size;
	h->ktime_ns = as_boot_ns();
	h->cgroup_id = cgid;
	h->pid_ns = BPF_CORE_READ(up.ns, ns.inum);
	h->mnt_ns = BPF_CORE_READ(t, nsproxy, mnt_ns, ns.inum);
	h->host_pid = BPF_CORE_READ(t, tgid);
	h->host_ppid = BPF_CORE_READ(parent, tgid);
	h->pid = up.nr;
	h->ppid = as_tgid_at(parent, level);
	h->uid = (__u32)ugid;
	h->gid = ugid >> 32;
	h->ret = 0;
	h->flags = flags;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
}

/*
 * Absolute path of (dentry, vfsmount) as the task sees it (up to its fs root), into
 * out[AS_PATH_LEN]. Walks d_parent, crossing mounts through mnt_mountpoint. Returns
 * AS_F_TRUNC_PATH if the path did not fit or was deeper than AS_MAX_DEPTH, else 0.
 */
static __always_inline __u32 as_path(struct dentry *d, struct vfsmount *vm, struct path *root, char *out)
{
	__u32 zero = 0, pos = AS_PATH_LEN - 1, trunc = AS_F_TRUNC_PATH;
	struct as_scratch *s = bpf_map_lookup_elem(&as_proc_scratch, &zero);
	struct dentry *root_d = BPF_CORE_READ(root, dentry);
	struct vfsmount *root_mnt = BPF_CORE_READ(root, mnt);
	struct mount *mnt = container_of(vm, struct mount, mnt);

	if (!s)
		return 0;
	s->buf[AS_PATH_LEN - 1] = 0;
	for (int i = 0; i < AS_MAX_DEPTH; i++) {
		if (d == root_d && vm == root_mnt) {
			trunc = 0;
			break;
		}
		if (d == BPF_CORE_READ(vm, mnt_root)) {
			struct mount *up = BPF_CORE_READ(mnt, mnt_parent);

			if (up == mnt) { /* root of the mount namespace */
				trunc = 0;
				break;
			}
			d = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			vm = &up->mnt;
			continue;
		}
		struct dentry *parent = BPF_CORE_READ(d, d_parent);
		if (parent == d) { /* root of a filesystem that is not mounted here */
			trunc = 0;
			break;
		}
		struct qstr name = BPF_CORE_READ(d, d_name);
		__u32 len = name.len & (AS_PATH_LEN - 1);

		if (len + 1 > pos)
			break; /* does not fit: trunc stays set */
		pos = (pos - len - 1) & (AS_PATH_LEN - 1);
		bpf_probe_read_kernel(&s->buf[pos + 1], len, name.name);
		s->buf[pos] = '/';
		d = parent;
	}
	if (pos == AS_PATH_LEN - 1) { /* the root itself */
		out[0] = '/';
		return trunc;
	}
	bpf_probe_read_kernel(out, AS_PATH_LEN - pos, &s->buf[pos]);
	return trunc;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(as_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u32 flags = 0;

	if (!as_visible(cgid, p, AS_VIS_PROCESS, &flags))
		return 0;
	struct as_exec_rec *r = as_reserve(&as_proc_rb, sizeof(*r), AS_KIND_EXEC);
	if (!r)
		return 0;
	/* Ring-buffer memory is not zeroed: strings must be NUL-padded and nothing may
	 * leak. clang will not inline a memset this large for BPF, so store words
	 * (volatile, or clang turns the loop back into a memset). */
	volatile __u64 *w = (volatile __u64 *)r;
#pragma unroll
	for (int i = 0; i < sizeof(*r) / 8; i++)
		w[i] = 0;

	struct file *exe = BPF_CORE_READ(bprm, file);
	struct path exe_path = BPF_CORE_READ(exe, f_path);
	struct path root = BPF_CORE_READ(p, fs, root);
	struct path pwd = BPF_CORE_READ(p, fs, pwd);
	struct mm_struct *mm = BPF_CORE_READ(p, mm);
	__u64 arg_start = BPF_CORE_READ(mm, arg_start);
	__u64 args_len = BPF_CORE_READ(mm, arg_end) - arg_start;

	flags |= as_path(exe_path.dentry, exe_path.mnt, &root, r->path);
	flags |= as_path(pwd.dentry, pwd.mnt, &root, r->cwd);
	if (args_len > AS_ARGS_LEN) {
		args_len = AS_ARGS_LEN;
		flags |= AS_F_TRUNC_ARGS;
	}
	bpf_probe_read_user(r->args, args_len, (void *)arg_start);
	r->args_len = args_len;
	r->argc = BPF_CORE_READ(bprm, argc);
	r->exe_ino = BPF_CORE_READ(exe, f_inode, i_ino);
	r->exe_uid = BPF_CORE_READ(exe, f_inode, i_uid.val);
	BPF_CORE_READ_STR_INTO(&r->parent_comm, p, real_parent, comm);
	as_fill_hdr(&r->hdr, p, AS_KIND_EXEC, sizeof(*r), cgid, flags);
	bpf_ringbuf_submit(r, 0);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(as_fork, struct task_struct *parent, struct task_struct *child)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u32 flags = 0;

	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid))
		return 0; /* a new thread, not a new process */
	if (!as_visible(cgid, parent, AS_VIS_PROCESS, &flags))
		return 0;
	struct as_fork_rec *r = as_reserve(&as_proc_rb, sizeof(*r), AS_KIND_FORK);
	if (!r)
		return 0;
	as_fill_hdr(&r->hdr, parent, AS_KIND_FORK, sizeof(*r), cgid, flags);
	r->child_host_pid = BPF_CORE_READ(child, tgid);
	r->child_pid = as_tgid_at(child, as_pid_level(child));
	bpf_ringbuf_submit(r, 0);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(as_exit, struct task_struct *p)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u32 flags = 0;

	if (BPF_CORE_READ(p, pid) != BPF_CORE_READ(p, tgid))
		return 0; /* a thread: the process lives on */
	if (!as_visible(cgid, p, AS_VIS_PROCESS, &flags))
		return 0;
	struct as_exit_rec *r = as_reserve(&as_proc_rb, sizeof(*r), AS_KIND_EXIT);
	if (!r)
		return 0;
	as_fill_hdr(&r->hdr, p, AS_KIND_EXIT, sizeof(*r), cgid, flags);
	r->exit_code = BPF_CORE_READ(p, exit_code);
	r->_pad0 = 0;
	bpf_ringbuf_submit(r, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
