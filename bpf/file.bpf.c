// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * File monitor: every open(2), creat(2), openat(2) and openat2(2) of a watched task
 * (AS_VIS_FILE) becomes one as_file_rec in as_file_rb, with its absolute path,
 * flags and mode as passed, result (fd or -errno), inode, device and owner.
 *
 * Hooks: the per-syscall tracepoints (syscalls/sys_enter_* and sys_exit_*), which
 * load everywhere and cost unwatched tasks one hash lookup on open only. Kernel
 * structs are read through AS_READ (cast.bpf.h): plain loads, or helpers when portable. No
 * tracepoint carries the opened struct file, so enter stashes the arguments by
 * thread id (as bcc's opensnoop does) and exit completes the record:
 *  - success: the path is the opened file's own (struct file from the fd table,
 *    dentry walk): symlinks resolved, "." and ".." gone, dirfd and cwd applied;
 *  - failure: the name as passed, made absolute against the dirfd's directory or
 *    the cwd ("." and ".." kept as written: nothing was resolved).
 * Not seen: io_uring IORING_OP_OPENAT (no syscall) and 32-bit compat syscalls.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "armorstream.h"
#include "path.bpf.h"
#include "record.bpf.h"

#define AS_AT_FDCWD -100
#define AS_O_CREAT 0100
#define AS_O_WRONLY 01
#define AS_O_TRUNC 01000

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} as_file_rb SEC(".maps");

/* Arguments of an open in flight, from sys_enter to sys_exit of the same thread. */
struct as_open_args {
	__u64 cgid;
	const char *name;
	__s32 dfd;
	__u32 flags; /* O_* as passed */
	__u32 mode;
	__u32 rflags; /* hdr.flags decided at enter (AS_F_HOST) */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64); /* pid_tgid: one syscall in flight per thread */
	__type(value, struct as_open_args);
} as_open_args SEC(".maps");

static __always_inline int as_open_enter(__s32 dfd, const char *name, __u32 oflags, __u32 mode)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u32 flags = 0;

	if (!as_visible(cgid, (struct task_struct *)bpf_get_current_task(), AS_VIS_FILE, &flags))
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	struct as_open_args a = {
		.cgid = cgid, .name = name, .dfd = dfd, .flags = oflags, .mode = mode, .rflags = flags,
	};
	bpf_map_update_elem(&as_open_args, &id, &a, BPF_ANY);
	return 0;
}

/* The kernel's dev_t (major << 20 | minor) in the encoding stat(2) returns. */
static __always_inline __u32 as_user_dev(__u32 dev)
{
	__u32 major = dev >> 20, minor = dev & 0xfffff;

	return (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12);
}

/* What the task asked for, made absolute, for an open that produced no file. */
static __always_inline __u32 as_asked_path(struct task_struct *t, struct as_open_args *a, struct path *root,
					   char *out)
{
	char first = 0;
	struct path dir;

	bpf_probe_read_user(&first, 1, a->name);
	if (first == '/') {
		long n = bpf_probe_read_user_str(out, AS_PATH_LEN, a->name);
		return n == AS_PATH_LEN ? AS_F_TRUNC_PATH : 0; /* may be exactly full: cut or not, it filled */
	}
	if (a->dfd == AS_AT_FDCWD) {
		dir = AS_READ(t, fs, pwd);
	} else {
		struct file *f = as_fd_file(t, a->dfd);

		if (!f) { /* a bad dirfd: keep the relative name */
			bpf_probe_read_user_str(out, AS_PATH_LEN, a->name);
			return 0;
		}
		dir = AS_READ(f, f_path);
	}
	return as_join_user(&dir, root, a->name, out);
}

static __always_inline int as_open_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct as_open_args *a = bpf_map_lookup_elem(&as_open_args, &id);

	if (!a)
		return 0;
	struct as_file_rec *r = as_reserve(&as_file_rb, sizeof(*r), AS_KIND_FILE);
	if (!r)
		goto out;
	AS_ZERO(r);

	struct task_struct *t = (struct task_struct *)bpf_get_current_task();
	struct path root = AS_READ(t, fs, root);
	struct file *f = ret >= 0 ? as_fd_file(t, ret) : 0;
	__u32 flags = a->rflags;

	r->open_flags = a->flags;
	r->mode = a->mode;
	r->owner_uid = 0xffffffff;
	if (f) {
		struct inode *ino = AS_READ(f, f_inode);

		flags |= as_path(AS_READ(f, f_path.dentry), AS_READ(f, f_path.mnt), &root, r->path);
		r->ino = AS_READ(ino, i_ino);
		r->dev = as_user_dev(AS_READ(ino, i_sb, s_dev));
		r->owner_uid = AS_READ(ino, i_uid.val);
	} else {
		/* Failed, or the fd was closed by another thread before this exit ran. */
		flags |= as_asked_path(t, a, &root, r->path);
	}
	as_fill_hdr(&r->hdr, t, AS_KIND_FILE, sizeof(*r), a->cgid, flags);
	r->hdr.ret = ret;
	bpf_ringbuf_submit(r, 0);
out:
	bpf_map_delete_elem(&as_open_args, &id);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_open")
int as_enter_open(struct trace_event_raw_sys_enter *ctx)
{
	return as_open_enter(AS_AT_FDCWD, (const char *)ctx->args[0], ctx->args[1], ctx->args[2]);
}

SEC("tracepoint/syscalls/sys_enter_creat")
int as_enter_creat(struct trace_event_raw_sys_enter *ctx)
{
	/* creat(p, m) is open(p, O_CREAT|O_WRONLY|O_TRUNC, m): record the flags it means. */
	return as_open_enter(AS_AT_FDCWD, (const char *)ctx->args[0], AS_O_CREAT | AS_O_WRONLY | AS_O_TRUNC,
			     ctx->args[1]);
}

SEC("tracepoint/syscalls/sys_enter_openat")
int as_enter_openat(struct trace_event_raw_sys_enter *ctx)
{
	return as_open_enter(ctx->args[0], (const char *)ctx->args[1], ctx->args[2], ctx->args[3]);
}

SEC("tracepoint/syscalls/sys_enter_openat2")
int as_enter_openat2(struct trace_event_raw_sys_enter *ctx)
{
	struct open_how how = {};

	bpf_probe_read_user(&how, sizeof(how), (void *)ctx->args[2]);
	return as_open_enter(ctx->args[0], (const char *)ctx->args[1], how.flags, how.mode);
}

SEC("tracepoint/syscalls/sys_exit_open")
int as_exit_open(struct trace_event_raw_sys_exit *ctx)
{
	return as_open_exit(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_creat")
int as_exit_creat(struct trace_event_raw_sys_exit *ctx)
{
	return as_open_exit(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_openat")
int as_exit_openat(struct trace_event_raw_sys_exit *ctx)
{
	return as_open_exit(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_openat2")
int as_exit_openat2(struct trace_event_raw_sys_exit *ctx)
{
	return as_open_exit(ctx->ret);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
