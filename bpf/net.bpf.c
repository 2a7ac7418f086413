// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Network monitor: socket, connect, bind, listen and accept/accept4 of a watched task
 * (AS_VIS_NETWORK), one as_net_rec each in as_net_rb, written when the syscall
 * returns, so every record carries the result.
 *
 * Hooks: the per-syscall tracepoints, enter stashing the arguments by thread id and
 * exit completing the record. What each side of a record comes from:
 *  - socket:  family, type (SOCK_TYPE_MASK bits) and protocol as passed; fd = result.
 *  - connect: destination from the caller's sockaddr (also on failure); source address
 *             and port from the socket afterwards (0 if the kernel bound none).
 *  - bind:    the bound address and port from the socket when it succeeded (port 0
 *             becomes the port the kernel chose), else from the caller's sockaddr.
 *  - listen:  the listening address and port from the socket.
 *  - accept:  local and peer address of the new socket; fd = the new fd. A failed
 *             accept reports the listening socket; -EAGAIN (nothing to accept, the
 *             idle loop of every non-blocking server) is not reported.
 * For every op but socket, family, type and protocol are the socket's own (protocol
 * 0 resolved by the kernel, e.g. to IPPROTO_TCP).
 * The cgroup/connect4/6 and sock_create hooks (netblock.bpf.c) see the same calls
 * before they happen, without results; here is what the task got back. Not seen:
 * io_uring connect/accept, sendto/sendmsg destinations, 32-bit compat syscalls.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "armorstream.h"
#include "path.bpf.h"
#include "record.bpf.h"

#define AS_AF_INET 2
#define AS_AF_INET6 10
#define AS_S_IFMT 00170000
#define AS_S_IFSOCK 0140000
#define AS_EAGAIN 11
#define AS_SOCK_TYPE_MASK 0xf

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} as_net_rb SEC(".maps");

/* Arguments of a call in flight, from sys_enter to sys_exit of the same thread. */
struct as_net_args {
	__u64 cgid;
	__u64 uaddr;   /* struct sockaddr __user * (connect, bind) */
	__u32 addrlen;
	__s32 fd;      /* socket fd argument (connect, bind, listen, accept) */
	__u16 op;      /* enum as_net_op */
	__u16 family;  /* socket(): as passed */
	__u16 type;
	__u16 protocol;
	__u32 rflags;  /* hdr.flags decided at enter (AS_F_HOST) */
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64); /* pid_tgid: one syscall in flight per thread */
	__type(value, struct as_net_args);
} as_net_args SEC(".maps");

static __always_inline int as_net_enter(struct as_net_args *a)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u32 flags = 0;

	if (!as_visible(cgid, (struct task_struct *)bpf_get_current_task(), AS_VIS_NETWORK, &flags))
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	a->cgid = cgid;
	a->rflags = flags;
	bpf_map_update_elem(&as_net_args, &id, a, BPF_ANY);
	return 0;
}

/* The socket behind `fd`, or NULL when `fd` is not a socket. */
static __always_inline struct socket *as_fd_socket(struct task_struct *t, int fd)
{
	struct file *f = as_fd_file(t, fd);

	if (!f || (AS_READ(f, f_inode, i_mode) & AS_S_IFMT) != AS_S_IFSOCK)
		return 0;
	return AS_READ(f, private_data);
}

/* Address and port from a user sockaddr (IPv4 or IPv6); returns its family. */
static __always_inline __u16 as_user_sockaddr(struct as_net_args *a, __u8 *addr, __u16 *port)
{
	__u8 sa[24] = {}; /* sockaddr_in6 up to sin6_addr; the scope id is not kept */
	__u32 len = a->addrlen;

	if (!a->uaddr || len < 2)
		return 0;
	if (len > sizeof(sa))
		len = sizeof(sa);
	bpf_probe_read_user(sa, len, (void *)a->uaddr);
	__u16 family = *(__u16 *)sa;

	if (family == AS_AF_INET) {
		*port = bpf_ntohs(*(__u16 *)&sa[2]);
		__builtin_memcpy(addr, &sa[4], 4);
	} else if (family == AS_AF_INET6) {
		*port = bpf_ntohs(*(__u16 *)&sa[2]);
		__builtin_memcpy(addr, &sa[8], 16);
	}
	return family;
}

static __always_inline void as_sock_local(struct sock *sk, __u16 family, __u8 *addr, __u16 *port)
{
	*port = AS_READ(sk, __sk_common.skc_num);
	if (family == AS_AF_INET)
		BPF_CORE_READ_INTO((__u32 *)addr, sk, __sk_common.skc_rcv_saddr);
	else if (family == AS_AF_INET6)
		BPF_CORE_READ_INTO((struct in6_addr *)addr, sk, __sk_common.skc_v6_rcv_saddr);
}

static __always_inline void as_sock_peer(struct sock *sk, __u16 family, __u8 *addr, __u16 *port)
{
	*port = bpf_ntohs(AS_READ(sk, __sk_common.skc_dport));
	if (family == AS_AF_INET)
		BPF_CORE_READ_INTO((__u32 *)addr, sk, __sk_common.skc_daddr);
	else if (family == AS_AF_INET6)
		BPF_CORE_READ_INTO((struct in6_addr *)addr, sk, __sk_common.skc_v6_daddr);
}

static __always_inline int as_net_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct as_net_args *a = bpf_map_lookup_elem(&as_net_args, &id);

	if (!a)
		return 0;
	if (a->op == AS_NET_ACCEPT && ret == -AS_EAGAIN)
		goto out;
	struct as_net_rec *r = as_reserve(&as_net_rb, sizeof(*r), AS_KIND_NET);
	if (!r)
		goto out;
	AS_ZERO(r);

	struct task_struct *t = (struct task_struct *)bpf_get_current_task();
	__u16 op = a->op;

	r->op = op;
	r->fd = a->fd;
	if (op == AS_NET_SOCKET) {
		r->family = a->family;
		r->type = a->type & AS_SOCK_TYPE_MASK;
		r->protocol = a->protocol;
		r->fd = ret >= 0 ? ret : -1;
	} else {
		int fd = op == AS_NET_ACCEPT && ret >= 0 ? ret : a->fd;
		struct socket *sock = as_fd_socket(t, fd);
		struct sock *sk = sock ? AS_READ(sock, sk) : 0;

		if (op == AS_NET_CONNECT)
			r->family = as_user_sockaddr(a, r->daddr, &r->dport);
		else if (op == AS_NET_BIND && ret < 0)
			r->family = as_user_sockaddr(a, r->saddr, &r->sport);
		if (sk) {
			/* Socket fields are u16 since 5.6 (bitfields before); ring buffers need 5.8. */
			__u16 family = AS_READ(sk, __sk_common.skc_family);

			r->family = family;
			r->type = AS_READ(sock, type);
			r->protocol = AS_READ(sk, sk_protocol);
			if (op != AS_NET_BIND || ret >= 0)
				as_sock_local(sk, family, r->saddr, &r->sport);
			if (op == AS_NET_ACCEPT && ret >= 0)
				as_sock_peer(sk, family, r->daddr, &r->dport);
		}
		r->fd = fd;
	}
	as_fill_hdr(&r->hdr, t, AS_KIND_NET, sizeof(*r), a->cgid, a->rflags);
	r->hdr.ret = ret < 0 ? ret : 0;
	bpf_ringbuf_submit(r, 0);
out:
	bpf_map_delete_elem(&as_net_args, &id);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_socket")
int as_enter_socket(struct trace_event_raw_sys_enter *ctx)
{
	struct as_net_args a = {
		.op = AS_NET_SOCKET, .family = ctx->args[0], .type = ctx->args[1], .protocol = ctx->args[2], .fd = -1,
	};
	return as_net_enter(&a);
}

SEC("tracepoint/syscalls/sys_enter_connect")
int as_enter_connect(struct trace_event_raw_sys_enter *ctx)
{
	struct as_net_args a = {
		.op = AS_NET_CONNECT, .fd = ctx->args[0], .uaddr = ctx->args[1], .addrlen = ctx->args[2],
	};
	return as_net_enter(&a);
}

SEC("tracepoint/syscalls/sys_enter_bind")
int as_enter_bind(struct trace_event_raw_sys_enter *ctx)
{
	struct as_net_args a = {
		.op = AS_NET_BIND, .fd = ctx->args[0], .uaddr = ctx->args[1], .addrlen = ctx->args[2],
	};
	return as_net_enter(&a);
}

SEC("tracepoint/syscalls/sys_enter_listen")
int as_enter_listen(struct trace_event_raw_sys_enter *ctx)
{
	struct as_net_args a = {.op = AS_NET_LISTEN, .fd = ctx->args[0]};
	return as_net_enter(&a);
}

SEC("tracepoint/syscalls/sys_enter_accept")
int as_enter_accept(struct trace_event_raw_sys_enter *ctx)
{
	struct as_net_args a = {.op = AS_NET_ACCEPT, .fd = ctx->args[0]};
	return as_net_enter(&a);
}

SEC("tracepoint/syscalls/sys_enter_accept4")
int as_enter_accept4(struct trace_event_raw_sys_enter *ctx)
{
	struct as_net_args a = {.op = AS_NET_ACCEPT, .fd = ctx->args[0]};
	return as_net_enter(&a);
}

#define AS_NET_EXIT(call)                                                   \
	SEC("tracepoint/syscalls/sys_exit_" #call)                          \
	int as_exit_##call(struct trace_event_raw_sys_exit *ctx)            \
	{                                                                   \
		return as_net_exit(ctx->ret);                               \
	}

AS_NET_EXIT(socket)
AS_NET_EXIT(connect)
AS_NET_EXIT(bind)
AS_NET_EXIT(listen)
AS_NET_EXIT(accept)
AS_NET_EXIT(accept4)

char LICENSE[] SEC("license") = "Dual BSD/GPL";
