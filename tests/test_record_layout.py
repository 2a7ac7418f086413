"""enforcer/records.py against bpf/armorstream.h, as the compiler laid it out (BTF).

Every member's name, byte offset and type (size, signedness, array length, nesting) and
every struct's size must match; so must the enums (from BTF) and the #defines (from the
header text). A change to either side alone fails here.
"""

from __future__ import annotations

import json
import re
import subprocess
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enforcer import records
from tests.conftest import ROOT, need_tool

HEADER = ROOT / "bpf" / "armorstream.h"
OBJECT = ROOT / "bpf" / ".output" / "records.bpf.o"

Layout = Any  # ("int", size, signed) | ("char",) | ("array", elem, n) | ("struct", size, [members])


@pytest.fixture(scope="module")
def btf() -> dict[str, dict[str, Any]]:
    """Named BTF types of the anchor object, freshly built (make is a no-op when up to date)."""
    need_tool("clang")
    need_tool("bpftool")
    need_tool("make")
    subprocess.run(["make", "-s", "-C", str(ROOT / "bpf"), ".output/records.bpf.o"], check=True)
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(OBJECT)], check=True, capture_output=True, text=True
    ).stdout
    types = json.loads(out)["types"]
    by_id = {t["id"]: t for t in types}
    named = {t["name"]: t for t in types if t.get("name") not in (None, "(anon)")}
    named["__by_id__"] = by_id
    return named


def btf_layout(by_id: dict[int, dict[str, Any]], type_id: int) -> Layout:
    t = by_id[type_id]
    kind = t["kind"]
    if kind in ("TYPEDEF", "CONST", "VOLATILE"):
        return btf_layout(by_id, t["type_id"])
    if kind == "INT":
        if t["name"] == "char":
            return ("char",)
        return ("int", t["size"], t["encoding"] == "SIGNED")
    if kind == "ARRAY":
        return ("array", btf_layout(by_id, t["type_id"]), t["nr_elems"])
    if kind == "STRUCT":
        members = []
        for m in t["members"]:
            assert m["bits_offset"] % 8 == 0, f"{t['name']}.{m['name']} is a bit field"
            members.append((m["name"], m["bits_offset"] // 8, btf_layout(by_id, m["type_id"])))
        return ("struct", t["size"], members)
    raise AssertionError(f"unexpected BTF kind {kind} in a record")


def dtype_layout(dt: np.dtype[Any]) -> Layout:
    if dt.names is not None:
        assert dt.fields is not None
        members = [(n, dt.fields[n][1], dtype_layout(dt.fields[n][0])) for n in dt.names]
        return ("struct", dt.itemsize, members)
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        assert len(shape) == 1, "multi-dimensional arrays are not in the contract"
        return ("array", dtype_layout(base), shape[0])
    if dt.kind == "S":  # char[N]
        return ("array", ("char",), dt.itemsize)
    assert dt.kind in "iu", f"unexpected dtype {dt}"
    assert dt.byteorder in ("<", "|", "="), f"{dt} is not little-endian"
    return ("int", dt.itemsize, dt.kind == "i")


@pytest.mark.parametrize("kind", sorted(records.DTYPES), ids=lambda k: records.Kind(k).name)
def test_record_matches_btf(btf: dict[str, Any], kind: int) -> None:
    name = records.STRUCT_NAMES[kind]
    assert name in btf, f"struct {name} is not in the object's BTF"
    expected = btf_layout(btf["__by_id__"], btf[name]["id"])
    got = dtype_layout(records.DTYPES[kind])
    if kind == records.Kind.LOST:  # LOST_DTYPE wraps a bare header
        got = got[2][0][2]
    assert got == expected


def test_hdr_dtype_matches_btf(btf: dict[str, Any]) -> None:
    assert dtype_layout(records.HDR_DTYPE) == btf_layout(btf["__by_id__"], btf["as_hdr"]["id"])


def test_every_btf_record_is_mirrored(btf: dict[str, Any]) -> None:
    in_btf = {n for n, t in btf.items() if n.startswith("as_") and t["kind"] == "STRUCT"}
    assert in_btf == set(records.STRUCT_NAMES.values())


def test_header_and_body_names_do_not_collide() -> None:
    # columns() flattens hdr into the record's namespace.
    hdr_names = set(records.HDR_DTYPE.names or ())
    for dt in records.DTYPES.values():
        assert not hdr_names & (set(dt.names or ()) - {"hdr"}), dt


ENUMS: dict[str, tuple[str, type[Enum]]] = {
    "as_kind": ("AS_KIND_", records.Kind),
    "as_flag": ("AS_F_", records.Flag),
    "as_net_op": ("AS_NET_", records.NetOp),
    "as_visibility": ("AS_VIS_", records.Visibility),
}


@pytest.mark.parametrize("enum_name", sorted(ENUMS))
def test_enum_matches_btf(btf: dict[str, Any], enum_name: str) -> None:
    prefix, py_enum = ENUMS[enum_name]
    assert btf[enum_name]["kind"] == "ENUM"
    c_values = {v["name"]: v["val"] for v in btf[enum_name]["values"]}
    py_values = {prefix + m.name: int(m.value) for m in py_enum}
    assert py_values == c_values


def test_every_btf_enum_is_mirrored(btf: dict[str, Any]) -> None:
    assert {n for n, t in btf.items() if n.startswith("as_") and t["kind"] == "ENUM"} == set(ENUMS)


def test_kinds_have_dtypes() -> None:
    assert set(records.DTYPES) == {int(k) for k in records.Kind}


def test_defines_match_header() -> None:
    defines = dict(re.findall(r"^#define (AS_[A-Z_]+)\s+(\d+)", HEADER.read_text(), re.M))
    assert defines, "no numeric #defines found: the parser is broken"
    py = {n: getattr(records, n) for n in defines if hasattr(records, n)}
    assert py == {n: int(v) for n, v in defines.items()}


def test_static_asserts_match_dtypes() -> None:
    # The header pins each sizeof; the mirror must agree even without a compiler.
    sizes = dict(re.findall(r"sizeof\(struct (as_\w+)\) == (\d+)", HEADER.read_text()))
    by_struct = {records.STRUCT_NAMES[k]: dt.itemsize for k, dt in records.DTYPES.items()}
    assert {n: int(v) for n, v in sizes.items()} == by_struct


def test_checker_notices_a_moved_field(btf: dict[str, Any]) -> None:
    # The comparison must be able to fail: shift one field by 4 bytes.
    dt = records.FILE_DTYPE
    assert dt.fields is not None
    names = list(dt.names or ())
    spec: Any = {
        "names": names,
        "formats": [dt.fields[n][0] for n in names],
        "offsets": [dt.fields[n][1] + (4 if n == "ino" else 0) for n in names],
        "itemsize": dt.itemsize,
    }
    moved = np.dtype(spec)
    assert dtype_layout(moved) != btf_layout(btf["__by_id__"], btf["as_file_rec"]["id"])


def test_object_is_fresh(btf: dict[str, Any]) -> None:
    # The fixture rebuilt it; guard against a stale object from an older header.
    assert OBJECT.stat().st_mtime >= max(p.stat().st_mtime for p in Path(HEADER).parent.glob("*.h"))
