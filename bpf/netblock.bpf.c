// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Network enforcement on any kernel with cgroup BPF: socket creation and connect
 * are checked against the workload's compiled network rules (enforce.h), keyed
 * by the current cgroup v2 id. Returning 0 fails the syscall with EPERM. Each
 * denial (and audit) is an as_net_rec with AS_F_BLOCKED (AS_F_AUDITED) in
 * as_enf_events.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#define AS_ENF_SOURCE AS_F_ENF_CGROUP
#include "enforce.bpf.h"

SEC("cgroup/sock_create")
int as_sock_create(struct bpf_sock *ctx)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u32 family = ctx->family, type = ctx->type, protocol = ctx->protocol;
	struct as_verdict v = as_net_decide(cgid, family, type, protocol);

	as_net_report(cgid, v, AS_NET_SOCKET, family, type, protocol, 0, 0, 0);
	return v.deny ? 0 : 1;
}

static __always_inline int as_connect(struct bpf_sock_addr *ctx, int v6)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u32 family = ctx->family, type = ctx->type, protocol = ctx->protocol;
	struct as_verdict v = as_net_decide(cgid, family, type, protocol);
	__u32 addr[4] = {};

	if (v.flags) {
		if (v6) {
			addr[0] = ctx->user_ip6[0];
			addr[1] = ctx->user_ip6[1];
			addr[2] = ctx->user_ip6[2];
			addr[3] = ctx->user_ip6[3];
		} else {
			addr[0] = ctx->user_ip4;
		}
		as_net_report(cgid, v, AS_NET_CONNECT, family, type, protocol,
			      bpf_ntohs((__u16)ctx->user_port), addr, v6 ? 4 : 1);
	}
	return v.deny ? 0 : 1;
}

SEC("cgroup/connect4")
int as_connect4(struct bpf_sock_addr *ctx)
{
	return as_connect(ctx, 0);
}

SEC("cgroup/connect6")
int as_connect6(struct bpf_sock_addr *ctx)
{
	return as_connect(ctx, 1);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
