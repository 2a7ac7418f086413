"""Decode throughput: per-record struct.unpack into dicts (baseline) vs decode_batch + columns.

Same envelope bytes, same run, median of repeats. The baseline is what a Python consumer
does without the vectorised path: one dict per record, strings cut at their NUL, argv
split. The candidate checks the envelope (CRC, per-record headers), views the records
with the kind's dtype and produces the same information as columns.

    .venv/bin/python bench/decode.py [--records N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from enforcer import records
from enforcer.envelope import decode_batch, decode_header, encode_batch
from enforcer.records import DTYPES, Kind

HDR_FMT = "<HHIQQIIIIIIIIiI16s"
BODY_FMT: dict[int, str] = {
    Kind.EXEC: "<IIQII16s256s256s512s",
    Kind.FILE: "<IIQII256s",
}
HDR_KEYS = [n for n in records.HDR_DTYPE.names or ()]
BODY_KEYS: dict[int, list[str]] = {
    Kind.EXEC: ["argc", "args_len", "exe_ino", "exe_uid", "_pad0", "parent_comm", "path", "cwd", "args"],
    Kind.FILE: ["open_flags", "mode", "ino", "dev", "owner_uid", "path"],
}


def synthetic(kind: int, n: int) -> bytes:
    rng = np.random.default_rng(1)
    recs = np.zeros(n, dtype=DTYPES[kind])
    h = recs["hdr"]
    h["kind"], h["version"], h["size"] = kind, records.AS_SCHEMA_VERSION, DTYPES[kind].itemsize
    h["ktime_ns"] = np.arange(n, dtype=np.uint64) * 1000
    h["cgroup_id"] = rng.integers(1, 50, n)
    h["host_pid"] = rng.integers(1, 1 << 22, n)
    h["comm"] = b"bash"
    recs["path"] = [f"/usr/lib/x86_64-linux-gnu/libfoo{i % 300}.so".encode() for i in range(n)]
    if kind == Kind.EXEC:
        args = b"/bin/sh\0-c\0echo hello world\0"
        recs["args"], recs["args_len"], recs["argc"] = args, len(args), 3
        recs["cwd"] = b"/home/user/project"
    return encode_batch(kind, recs.tobytes(), node="node-1", seq=0)


def per_record(msg: bytes) -> list[dict[str, Any]]:
    h = decode_header(msg)  # per batch, not per record: kept out of the comparison
    kind, size, count, hlen = h.kind, h.record_size, h.count, h.header_len
    hdr_s, body_s = struct.Struct(HDR_FMT), struct.Struct(BODY_FMT[kind])
    keys = HDR_KEYS + BODY_KEYS[kind]
    out = []
    for off in range(hlen, hlen + count * size, size):
        d = dict(zip(keys, hdr_s.unpack_from(msg, off) + body_s.unpack_from(msg, off + 80), strict=True))
        for k in ("comm", "path", "cwd", "parent_comm"):
            if k in d:
                d[k] = d[k].split(b"\0", 1)[0]
        if "args" in d:
            d["argv"] = d.pop("args")[: d["args_len"]].split(b"\0")[: d["argc"]]
        out.append(d)
    return out


def vectorised(msg: bytes) -> dict[str, np.ndarray]:
    hdr, recs = decode_batch(msg)
    cols = records.columns(recs)
    if hdr.kind == Kind.EXEC:
        cols["args"] = records.args_joined(recs)
    return cols


def median_seconds(fn: Callable[[bytes], object], msg: bytes, repeats: int) -> float:
    fn(msg)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(msg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"{a.records} records per batch, median of {a.repeats}")
    for kind in (Kind.EXEC, Kind.FILE):
        msg = synthetic(kind, a.records)
        # Same information out of both paths (spot check, so the comparison is honest).
        base, cand = per_record(msg), vectorised(msg)
        assert [d["host_pid"] for d in base] == cand["host_pid"].tolist()
        assert [d["path"] for d in base] == cand["path"].tolist()
        tb = median_seconds(per_record, msg, a.repeats)
        tc = median_seconds(vectorised, msg, a.repeats)
        print(
            f"{kind.name:5} {len(msg) / 1e6:6.1f} MB  per-record dicts {a.records / tb / 1e3:8.0f} k rec/s"
            f"   decode_batch+columns {a.records / tc / 1e6:7.2f} M rec/s   {tb / tc:6.1f}x faster"
        )


if __name__ == "__main__":
    main()
