// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Record-contract anchor: references every record type so all of them land in
 * this object's BTF, where tests/test_record_layout.py compares them with
 * enforcer/records.py. Never loaded by the sensor.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "armorstream.h"

struct as_exec_rec _as_exec_rec __attribute__((unused));
struct as_exit_rec _as_exit_rec __attribute__((unused));
struct as_fork_rec _as_fork_rec __attribute__((unused));
struct as_file_rec _as_file_rec __attribute__((unused));
struct as_net_rec _as_net_rec __attribute__((unused));
struct as_cap_rec _as_cap_rec __attribute__((unused));
/* Enums land in BTF only when something has their type. */
enum as_kind _as_kind __attribute__((unused));
enum as_flag _as_flag __attribute__((unused));
enum as_net_op _as_net_op __attribute__((unused));
enum as_visibility _as_visibility __attribute__((unused));

char LICENSE[] SEC("license") = "Dual BSD/GPL";
