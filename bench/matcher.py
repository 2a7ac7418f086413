"""Matcher throughput: decisions/s for 10 and 1,000 policies, against baselines from the same run.

    .venv/bin/python bench/matcher.py [--decisions N] [--repeats R] [--seed S]

Policies are generated across 10 namespaces x 20 apps (paths, recursive and flat
directories, globs, ownerOnly/readOnly, fromSource, Block/Audit/Allow, some cluster
policies). Events: a skewed (Zipf-like) mix of repeated process/file/network events from
60 workloads plus a share of never-seen-before ones (new temp files), as a node produces.

Three paths, same events:
  cached        Matcher.decide: rules compiled per workload + decision cache
  compiled-only rules compiled per workload, every decision evaluated
  uncached      select and compile the workload's policies on every call
Each is timed `repeats` times after a warm-up pass; the median is reported.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

from enforcer.karmor_log import Event
from enforcer.matcher import Matcher
from enforcer.policy.model import (
    Action,
    Expression,
    FileRule,
    FromSource,
    NetworkRule,
    Operation,
    Policy,
    PolicyKind,
    ProcessRule,
    RuleMeta,
    Selector,
    Target,
)
from enforcer.workload import Workload

NAMESPACES = [f"team-{i}" for i in range(10)]
APPS = [f"app-{i}" for i in range(20)]
BINARIES = ["/bin/bash", "/bin/cat", "/usr/bin/python3", "/usr/bin/curl", "/bin/ls", "/usr/sbin/nginx"]


def make_policies(n: int, rng: random.Random) -> list[Policy]:
    policies: list[Policy] = []
    for i in range(n):
        action = rng.choices([Action.BLOCK, Action.AUDIT, Action.ALLOW], weights=[6, 3, 1])[0]
        meta = RuleMeta(action, rng.randint(1, 10), ("MITRE",) if i % 3 == 0 else (), f"policy {i}")
        app = rng.choice(APPS)
        files: list[FileRule] = []
        for k in range(rng.randint(2, 6)):
            kind = rng.random()
            src = (FromSource(path=rng.choice(BINARIES)),) if rng.random() < 0.2 else ()
            if kind < 0.5:
                files.append(FileRule(Target.PATH, f"/etc/{app}/conf-{i}-{k}.yaml", meta, from_source=src))
            elif kind < 0.8:
                files.append(
                    FileRule(
                        Target.DIR,
                        f"/var/lib/{app}/d{i % 7}/",
                        meta,
                        recursive=rng.random() < 0.5,
                        read_only=rng.random() < 0.3,
                        owner_only=rng.random() < 0.2,
                        from_source=src,
                    )
                )
            else:
                files.append(FileRule(Target.PATTERN, f"/run/{app}/*-{k}.sock", meta))
        procs = [ProcessRule(Target.PATH, f"/usr/local/bin/tool-{i % 50}", meta)]
        if rng.random() < 0.3:
            procs.append(ProcessRule(Target.DIR, "/tmp/", meta, recursive=True))
        network = [NetworkRule(rng.choice(["tcp", "udp", "raw", "icmp"]), meta)] if rng.random() < 0.3 else []
        if i % 50 == 49:  # a few cluster-wide policies
            sel = Selector(
                match_expressions=(Expression("namespace", "In", tuple(rng.sample(NAMESPACES, 3))),)
            )
            policies.append(
                Policy(
                    PolicyKind.CSP,
                    f"csp-{i}",
                    None,
                    sel,
                    action,
                    meta.severity,
                    file=tuple(files),
                    process=tuple(procs),
                    network=tuple(network),
                )
            )
            continue
        sel = Selector(match_labels=(("app", app),))
        policies.append(
            Policy(
                PolicyKind.KSP,
                f"ksp-{i}",
                rng.choice(NAMESPACES),
                sel,
                action,
                meta.severity,
                file=tuple(files),
                process=tuple(procs),
                network=tuple(network),
            )
        )
    return policies


def make_events(decisions: int, new_share: float, rng: random.Random) -> list[tuple[Workload, Event]]:
    workloads = [
        Workload.container(rng.choice(NAMESPACES), {"app": rng.choice(APPS), "tier": "web"}, "main")
        for _ in range(60)
    ]
    pool: list[tuple[Workload, Event]] = []
    for _ in range(3000):
        w = rng.choice(workloads)
        app = w.label_map["app"]
        proc = rng.choice(BINARIES)
        r = rng.random()
        if r < 0.45:
            ev = Event(
                Operation.FILE,
                rng.choice(
                    [
                        f"/etc/{app}/conf-{rng.randrange(1000)}-{rng.randrange(6)}.yaml",
                        f"/var/lib/{app}/d{rng.randrange(7)}/f{rng.randrange(20)}",
                        f"/var/lib/{app}/d{rng.randrange(7)}/sub/f{rng.randrange(20)}",
                        f"/run/{app}/x-{rng.randrange(6)}.sock",
                        f"/usr/lib/x86_64-linux-gnu/lib{rng.randrange(50)}.so",
                    ]
                ),
                proc,
                "/bin/bash",
                proc,
                rng.choice([0, 1000]),
                rng.choice([0, 1000]),
                rng.random() < 0.2,
            )
        elif r < 0.85:
            path = rng.choice(
                [f"/usr/local/bin/tool-{rng.randrange(60)}", "/bin/ls", "/tmp/x/run.sh", "/bin/sh"]
            )
            ev = Event(Operation.PROCESS, path, path, proc, proc, 0, 0)
        else:
            res = rng.choice(
                [
                    "domain=AF_INET type=SOCK_STREAM protocol=TCP",
                    "domain=AF_INET type=SOCK_DGRAM protocol=UDP",
                    "domain=AF_INET type=SOCK_RAW protocol=ICMP",
                ]
            )
            ev = Event(Operation.NETWORK, res, proc, "/bin/bash", proc, 0)
        pool.append((w, ev))
    # Zipf-like popularity: a few hot events (shell, libraries) dominate, as on a real node.
    weights = [1.0 / (rank + 1) for rank in range(len(pool))]
    # Fresh but equal objects, as the stream decodes each record anew: cache hits then pay
    # for an equality check, not just an identity check.
    stream = [(w, replace(ev)) for w, ev in rng.choices(pool, weights=weights, k=decisions)]
    for i in range(decisions):
        if rng.random() < new_share:
            w, _ = stream[i]
            stream[i] = (
                w,
                Event(
                    Operation.FILE,
                    f"/tmp/build-{i}/obj.o",
                    "/usr/bin/cc",
                    "/bin/make",
                    "/usr/bin/cc",
                    1000,
                    1000,
                    True,
                ),
            )
    return stream


def rate(
    fn: Callable[[Workload, Event], object], events: list[tuple[Workload, Event]], repeats: int
) -> float:
    for w, ev in events[: min(len(events), 2000)]:  # warm-up
        fn(w, ev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w, ev in events:
            fn(w, ev)
        times.append(time.perf_counter() - t0)
    return len(events) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decisions", type=int, default=300_000)
    ap.add_argument("--new-share", type=float, default=0.02, help="share of never-seen events")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    print(f"{'policies':>8}  {'path':<14}{'decisions/s':>14}  {'vs uncached':>12}  {'vs compiled-only':>17}")
    for n in (10, 1000):
        rng = random.Random(args.seed)
        policies = make_policies(n, rng)
        events = make_events(args.decisions, args.new_share, rng)
        cached_m = Matcher(policies)
        cached = rate(cached_m.decide, events, args.repeats)
        compiled = rate(Matcher(policies).decide_compiled_only, events[: args.decisions // 10], args.repeats)
        uncached_n = 20_000 if n <= 10 else 1_000  # it is slow: a smaller sample gives its rate
        uncached = rate(Matcher(policies).decide_uncached, events[:uncached_n], 1)
        # Same answers on every path (spot check, so the comparison is of equal work).
        probe = Matcher(policies)
        for w, ev in events[:500]:
            assert cached_m.decide(w, ev) == probe.decide_uncached(w, ev)
        distinct = len({(w, ev) for w, ev in events})
        for name, r in (("uncached", uncached), ("compiled-only", compiled), ("cached", cached)):
            print(f"{n:>8}  {name:<14}{r:>14,.0f}  {r / uncached:>11.1f}x  {r / compiled:>16.2f}x")
        hits = 1 - distinct / len(events)
        print(
            f"{'':>8}  {len(events):,} decisions, {distinct:,} distinct (hit rate >= {hits:.1%}), "
            f"{len(cached_m._compiled)} workloads compiled"
        )
    print("target: >= 500,000 decisions/s with 1,000 policies (cached path, one core)")


if __name__ == "__main__":
    main()
