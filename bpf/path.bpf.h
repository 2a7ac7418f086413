/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Absolute paths in the kernel: a bounded dentry walk from (dentry, vfsmount) up
 * to the task's root, a struct file looked up in the task's fd table, and a
 * user-space relative name joined to a directory. No kernel string helpers
 * (bpf_d_path is LSM/fentry only), so this works from tracepoints.
 */
#ifndef __AS_PATH_BPF_H
#define __AS_PATH_BPF_H

#include "armorstream.h"
#include "cast.bpf.h"
#include "compat.bpf.h"

#define AS_MAX_DEPTH 40 /* path components walked before giving up (AS_F_TRUNC_PATH) */

/*
 * Paths are built backwards from the leaf in `walk`; `join` holds a directory plus
 * a user-supplied name. Twice AS_PATH_LEN keeps every bounded write inside the
 * buffer for the verifier.
 */
struct as_path_scratch {
	char walk[AS_PATH_LEN * 2];
	char join[AS_PATH_LEN * 2];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct as_path_scratch);
} as_path_scratch SEC(".maps");

static __always_inline struct as_path_scratch *as_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&as_path_scratch, &zero);
}

/*
 * Absolute path of (dentry, vfsmount) as the task sees it (up to its fs root), into
 * out[AS_PATH_LEN]; *len gets its length. Walks d_parent, crossing mounts through
 * mnt_mountpoint. A path that does not fit keeps its leaf end (the most specific
 * part). Returns AS_F_TRUNC_PATH if the path did not fit or was deeper than
 * AS_MAX_DEPTH, else 0.
 */
static __always_inline __u32 as_path_len(struct dentry *dentry, struct vfsmount *vfsmount, struct path *root,
					 char *out, __u32 *len)
{
	__u32 pos = AS_PATH_LEN - 1, trunc = AS_F_TRUNC_PATH;
	struct as_path_scratch *s = as_scratch();
	struct dentry *d = AS_PTR(dentry, struct dentry);
	struct vfsmount *vm = AS_PTR(vfsmount, struct vfsmount);
	struct dentry *root_d = root->dentry;
	struct vfsmount *root_mnt = root->mnt;
	struct mount *mnt = AS_PTR(container_of(vfsmount, struct mount, mnt), struct mount);

	*len = 0;
	if (!s)
		return 0;
	s->walk[AS_PATH_LEN - 1] = 0;
	for (int i = 0; i < AS_MAX_DEPTH; i++) {
		if (d == root_d && vm == root_mnt) {
			trunc = 0;
			break;
		}
		if (d == AS_READ(vm, mnt_root)) {
			struct mount *up = AS_READ(mnt, mnt_parent);

			if (up == mnt) { /* root of the mount namespace */
				trunc = 0;
				break;
			}
			d = AS_READ(mnt, mnt_mountpoint);
			mnt = up;
			vm = &up->mnt;
			continue;
		}
		struct dentry *parent = AS_READ(d, d_parent);
		if (parent == d) { /* root of a filesystem that is not mounted here */
			trunc = 0;
			break;
		}
		__u32 n = AS_READ(d, d_name.len) & (AS_PATH_LEN - 1);

		if (n + 1 > pos)
			break; /* does not fit: trunc stays set */
		pos = (pos - n - 1) & (AS_PATH_LEN - 1);
		bpf_probe_read_kernel(&s->walk[pos + 1], n, AS_READ(d, d_name.name));
		s->walk[pos] = '/';
		d = parent;
	}
	if (pos == AS_PATH_LEN - 1) { /* the root itself */
		out[0] = '/';
		out[1] = 0;
		*len = 1;
		return trunc;
	}
	bpf_probe_read_kernel(out, AS_PATH_LEN - pos, &s->walk[pos]);
	*len = AS_PATH_LEN - 1 - pos;
	return trunc;
}

static __always_inline __u32 as_path(struct dentry *d, struct vfsmount *vm, struct path *root, char *out)
{
	__u32 len;

	return as_path_len(d, vm, root, out, &len);
}

/* The struct file behind `fd` in `t`'s fd table, or NULL. */
static __always_inline struct file *as_fd_file(struct task_struct *t, int fd)
{
	struct fdtable *fdt = AS_READ(t, files, fdt);
	struct file *f = 0;

	if (fd < 0 || (__u32)fd >= AS_READ(fdt, max_fds))
		return 0;
	bpf_probe_read_kernel(&f, sizeof(f), AS_UNTYPED(AS_READ(fdt, fd)) + (__u64)(__u32)fd * sizeof(f));
	return f;
}

/*
 * `dir`/`name` into out[AS_PATH_LEN], with `name` a user-space string that did not
 * (or not yet) resolve to a file: what the task asked for, made absolute. "." and
 * ".." are kept as written. A result that does not fit keeps its start. Returns
 * AS_F_TRUNC_PATH when cut.
 */
static __always_inline __u32 as_join_user(struct path *dir, struct path *root, const char *name, char *out)
{
	struct as_path_scratch *s = as_scratch();
	__u32 len = 0, flags;
	long n;

	if (!s)
		return 0;
	flags = as_path_len(dir->dentry, dir->mnt, root, s->join, &len);
	len &= AS_PATH_LEN - 1;
	if (len > 1) { /* "/" already ends in a slash */
		s->join[len] = '/';
		len++;
	}
	if (len > AS_PATH_LEN) /* cannot happen; tells the verifier the bound */
		len = AS_PATH_LEN;
	n = bpf_probe_read_user_str(&s->join[len], AS_PATH_LEN, name);
	if (n > 0 && len + n - 1 > AS_PATH_LEN - 1)
		flags |= AS_F_TRUNC_PATH;
	bpf_probe_read_kernel(out, AS_PATH_LEN, s->join);
	out[AS_PATH_LEN - 1] = 0;
	return flags;
}

#endif /* __AS_PATH_BPF_H */
