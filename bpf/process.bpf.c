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
#include "path.bpf.h"
#include "record.bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} as_proc_rb SEC(".maps");

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
	AS_ZERO(r);

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
