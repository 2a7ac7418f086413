"""Typed ctypes wrapper over libbpf.so.1 (libbpf >= 1.0 semantics: errors are negative errnos,
or NULL plus errno). The only module that talks to libbpf.

Shape follows libbpf-tools: open, set read-only knobs, (pin paths), load, fill maps, attach,
poll ring buffers. A ring buffer's callback only appends the raw record bytes to a
bytearray per record kind; decoding happens later, per batch, with numpy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from enforcer.errors import ArmorstreamError

__all__ = ["PIN_ROOT", "BpfError", "Link", "Map", "Object", "RecordBuffers", "RingBuffer", "ensure_bpffs"]

PIN_ROOT: Final = Path("/sys/fs/bpf/armorstream")

_PERCPU_TYPES: Final = {5, 6, 10}  # BPF_MAP_TYPE_PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
_BTF_KIND_DATASEC: Final = 15

_p = ctypes.c_void_p
_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)


def _fn(name: str, res: Any, *args: Any) -> Any:
    f = getattr(_lib, name)
    f.restype, f.argtypes = res, list(args)
    return f


_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _p, _p, ctypes.c_size_t)

_open_file = _fn("bpf_object__open_file", _p, ctypes.c_char_p, _p)
_obj_load = _fn("bpf_object__load", ctypes.c_int, _p)
_obj_close = _fn("bpf_object__close", None, _p)
_obj_btf = _fn("bpf_object__btf", _p, _p)
_find_prog = _fn("bpf_object__find_program_by_name", _p, _p, ctypes.c_char_p)
_next_prog = _fn("bpf_object__next_program", _p, _p, _p)
_prog_name = _fn("bpf_program__name", ctypes.c_char_p, _p)
_prog_attach = _fn("bpf_program__attach", _p, _p)
_link_destroy = _fn("bpf_link__destroy", ctypes.c_int, _p)
_find_map = _fn("bpf_object__find_map_by_name", _p, _p, ctypes.c_char_p)
_next_map = _fn("bpf_object__next_map", _p, _p, _p)
_map_name = _fn("bpf_map__name", ctypes.c_char_p, _p)
_map_fd = _fn("bpf_map__fd", ctypes.c_int, _p)
_map_type = _fn("bpf_map__type", ctypes.c_int, _p)
_map_key_size = _fn("bpf_map__key_size", ctypes.c_uint32, _p)
_map_value_size = _fn("bpf_map__value_size", ctypes.c_uint32, _p)
_map_set_pin_path = _fn("bpf_map__set_pin_path", ctypes.c_int, _p, ctypes.c_char_p)
_map_unpin = _fn("bpf_map__unpin", ctypes.c_int, _p, ctypes.c_char_p)
_map_set_max_entries = _fn("bpf_map__set_max_entries", ctypes.c_int, _p, ctypes.c_uint32)
_map_initial_value = _fn("bpf_map__initial_value", _p, _p, ctypes.POINTER(ctypes.c_size_t))
_update = _fn("bpf_map_update_elem", ctypes.c_int, ctypes.c_int, _p, _p, ctypes.c_uint64)
_lookup = _fn("bpf_map_lookup_elem", ctypes.c_int, ctypes.c_int, _p, _p)
_delete = _fn("bpf_map_delete_elem", ctypes.c_int, ctypes.c_int, _p)
_next_key = _fn("bpf_map_get_next_key", ctypes.c_int, ctypes.c_int, _p, _p)
_rb_new = _fn("ring_buffer__new", _p, ctypes.c_int, _SAMPLE_FN, _p, _p)
_rb_add = _fn("ring_buffer__add", ctypes.c_int, _p, ctypes.c_int, _SAMPLE_FN, _p)
_rb_poll = _fn("ring_buffer__poll", ctypes.c_int, _p, ctypes.c_int)
_rb_consume = _fn("ring_buffer__consume", ctypes.c_int, _p)
_rb_free = _fn("ring_buffer__free", None, _p)
_btf_find = _fn("btf__find_by_name_kind", ctypes.c_int32, _p, ctypes.c_char_p, ctypes.c_uint32)
_btf_type = _fn("btf__type_by_id", _p, _p, ctypes.c_uint32)
_btf_name = _fn("btf__name_by_offset", ctypes.c_char_p, _p, ctypes.c_uint32)
_ncpus = _fn("libbpf_num_possible_cpus", ctypes.c_int)
_lookup_batch = _fn(
    "bpf_map_lookup_batch", ctypes.c_int, ctypes.c_int, _p, _p, _p, _p, ctypes.POINTER(ctypes.c_uint32), _p
)
_obj_info = _fn("bpf_obj_get_info_by_fd", ctypes.c_int, ctypes.c_int, _p, ctypes.POINTER(ctypes.c_uint32))

BPF_MAP_TYPE_RINGBUF: Final = 27


class BpfError(ArmorstreamError):
    """A libbpf call failed: what was attempted, on which object/program/map, and the errno."""

    def __init__(self, what: str, err: int, where: str = "") -> None:
        self.errno = abs(err)
        self.where = where
        text = os.strerror(self.errno) if self.errno else "failed"
        super().__init__(f"{what}{f' ({where})' if where else ''}: {text} [errno {self.errno}]")


def _check(ret: int, what: str, where: str) -> int:
    if ret < 0:
        raise BpfError(what, ret, where)
    return ret


def _ptr(ret: int | None, what: str, where: str) -> int:
    if not ret:
        raise BpfError(what, ctypes.get_errno() or errno.EINVAL, where)
    return ret


class Link:
    """An attached program; detached on close() (or left attached when pinned)."""

    def __init__(self, ptr: int, name: str) -> None:
        self._ptr: int | None = ptr
        self.name = name

    def close(self) -> None:
        if self._ptr:
            _link_destroy(self._ptr)
            self._ptr = None


class Map:
    """A map of a loaded object: typed key/value access with bytes."""

    def __init__(self, ptr: int, obj: str) -> None:
        self._ptr = ptr
        self.name: str = _map_name(ptr).decode()
        self._where = f"{obj}: map {self.name}"
        self.key_size: int = _map_key_size(ptr)
        self.value_size: int = _map_value_size(ptr)
        self.percpu = _map_type(ptr) in _PERCPU_TYPES
        # Per-CPU values come back as one 8-byte-aligned slot per possible CPU.
        self.ncpus = _check(_ncpus(), "count possible CPUs", self._where) if self.percpu else 1
        self._slot = (self.value_size + 7) & ~7 if self.percpu else self.value_size

    @property
    def fd(self) -> int:
        return _check(_map_fd(self._ptr), "map fd", self._where)

    def kernel_info(self) -> tuple[int, int]:
        """(map type, max_entries) as the kernel holds them: for a reused pin, the pinned map's."""
        info = (ctypes.c_uint32 * 6)()  # struct bpf_map_info up to map_flags
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(_obj_info(self.fd, info, ctypes.byref(size)), "map info", self._where)
        return info[0], info[4]

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.key_size:
            raise BpfError(f"key of {len(key)} bytes, map wants {self.key_size}", errno.EINVAL, self._where)
        return ctypes.create_string_buffer(key, len(key))

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        want = self._slot * self.ncpus
        if len(value) != want:
            raise BpfError(f"value of {len(value)} bytes, map wants {want}", errno.EINVAL, self._where)
        v = ctypes.create_string_buffer(value, len(value))
        _check(_update(self.fd, self._key(key), v, flags), "update", self._where)

    def lookup(self, key: bytes) -> bytes | None:
        """The value (per-CPU maps: all CPUs' slots concatenated), or None if absent."""
        v = ctypes.create_string_buffer(self._slot * self.ncpus)
        ret = _lookup(self.fd, self._key(key), v)
        if ret == -errno.ENOENT:
            return None
        _check(ret, "lookup", self._where)
        return v.raw

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[i * self._slot : i * self._slot + self.value_size] for i in range(self.ncpus)]

    def lookup_all_percpu(self, n: int) -> list[list[bytes]]:
        """Per-CPU values of keys 0..n-1 of a per-CPU array, in one syscall (BPF_MAP_LOOKUP_BATCH)."""
        slot = self._slot * self.ncpus
        keys = (ctypes.c_uint32 * n)()
        values = ctypes.create_string_buffer(slot * n)
        count = ctypes.c_uint32(n)
        out = ctypes.c_uint32()
        ret = _lookup_batch(self.fd, None, ctypes.byref(out), keys, values, ctypes.byref(count), None)
        if ret < 0 and ret != -errno.ENOENT:  # ENOENT: the array ended (count says how many)
            raise BpfError("lookup batch", ret, self._where)
        raw = values.raw
        return [
            [
                raw[k * slot + c * self._slot : k * slot + c * self._slot + self.value_size]
                for c in range(self.ncpus)
            ]
            for k in range(count.value)
        ]

    def delete(self, key: bytes) -> bool:
        ret = _delete(self.fd, self._key(key))
        if ret == -errno.ENOENT:
            return False
        _check(ret, "delete", self._where)
        return True

    def keys(self) -> Iterator[bytes]:
        cur: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = _next_key(self.fd, cur, nxt)
            if ret == -errno.ENOENT:
                return
            _check(ret, "next key", self._where)
            yield nxt.raw
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)

    def set_max_entries(self, n: int) -> None:
        """Before load only; for a ring buffer, n is its size in bytes (a power-of-2 of pages)."""
        _check(_map_set_max_entries(self._ptr, n), f"set max_entries {n}", self._where)

    def unpin(self, path: Path) -> None:
        _check(_map_unpin(self._ptr, str(path).encode()), f"unpin {path}", self._where)


class Object:
    """One .bpf.o: open() -> set_global()/pin_maps() -> load() -> attach_all() -> close()."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = self.path.name
        ctypes.set_errno(0)
        self._ptr: int | None = _ptr(_open_file(str(self.path).encode(), None), "open", self.name)
        self.links: list[Link] = []
        self.loaded = False

    def __enter__(self) -> Object:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ptr(self) -> int:
        if not self._ptr:
            raise BpfError("object is closed", errno.EBADF, self.name)
        return self._ptr

    def map(self, name: str) -> Map:
        return Map(_ptr(_find_map(self.ptr, name.encode()), f"no map {name}", self.name), self.name)

    def maps(self) -> list[Map]:
        out, cur = [], None
        while cur := _next_map(self.ptr, cur):
            out.append(Map(cur, self.name))
        return out

    def programs(self) -> list[str]:
        out, cur = [], None
        while cur := _next_prog(self.ptr, cur):
            out.append(_prog_name(cur).decode())
        return out

    def set_global(self, name: str, value: bytes) -> None:
        """Set a `const volatile` global (in .rodata) before load, like a skeleton's rodata."""
        if self.loaded:
            raise BpfError(f"set {name} after load", errno.EBUSY, self.name)
        btf = _ptr(_obj_btf(self.ptr), "object has no BTF", self.name)
        sec = _check(_btf_find(btf, b".rodata", _BTF_KIND_DATASEC), "find .rodata in BTF", self.name)
        t = _btf_type(btf, sec)
        info = ctypes.c_uint32.from_address(t + 4).value
        for i in range(info & 0xFFFF):  # struct btf_var_secinfo {type, offset, size} after the type
            var_id, off, size = (ctypes.c_uint32 * 3).from_address(t + 12 + 12 * i)
            var_name = _btf_name(btf, ctypes.c_uint32.from_address(_btf_type(btf, var_id)).value)
            if var_name == name.encode():
                if len(value) != size:
                    raise BpfError(f"{name} is {size} bytes, got {len(value)}", errno.EINVAL, self.name)
                rodata = self.map(".rodata")._ptr
                data = _ptr(_map_initial_value(rodata, ctypes.byref(ctypes.c_size_t())), "rodata", self.name)
                ctypes.memmove(data + off, value, size)
                return
        raise BpfError(f"no const volatile global {name}", errno.ENOENT, self.name)

    def pin_maps(self, directory: Path, names: list[str] | None = None) -> None:
        """Pin maps by name under `directory` at load; an existing compatible pin is reused,
        so state (watched cgroups, drop counters, unread records) survives a restart."""
        directory.mkdir(parents=True, exist_ok=True)
        for m in self.maps():
            if m.name.startswith("as_") and (names is None or m.name in names):
                _check(_map_set_pin_path(m._ptr, str(directory / m.name).encode()), "pin path", m._where)

    def load(self) -> None:
        _check(_obj_load(self.ptr), "load", self.name)
        self.loaded = True

    def attach(self, prog: str) -> Link:
        where = f"{self.name}: program {prog}"
        p = _ptr(_find_prog(self.ptr, prog.encode()), "no such program", where)
        ctypes.set_errno(0)
        link = Link(_ptr(_prog_attach(p), "attach", where), prog)
        self.links.append(link)
        return link

    def attach_all(self) -> list[Link]:
        return [self.attach(p) for p in self.programs()]

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.links.clear()
        if self._ptr:
            _obj_close(self._ptr)
            self._ptr = None


class RecordBuffers:
    """Raw records per kind (the low byte of a record's leading u16 kind), as both ring
    readers keep them: `held` bytes in all; `take()` hands them over and resets."""

    def __init__(self, high_water: int) -> None:
        self.pending: list[bytearray] = [bytearray() for _ in range(256)]
        self.held = 0
        self.high_water = high_water

    def take(self) -> list[tuple[int, bytes]]:
        """(kind, raw records) for every kind with pending bytes; the buffers are reset."""
        out = []
        for kind, buf in enumerate(self.pending):
            if buf:
                out.append((kind, bytes(buf)))
                buf.clear()
        self.held = 0
        return out


class RingBuffer(RecordBuffers):
    """One or more BPF ring buffers polled together.

    Records are appended, raw, to `pending[kind]` (the low byte of the record's leading
    u16 kind; every as_kind is < 256). No other Python work happens per record. When the
    bytes held pass `high_water`, the callback stops the current poll so the caller can ship.
    """

    def __init__(self, maps: list[Map], high_water: int = 4 << 20) -> None:
        if not maps:
            raise BpfError("ring buffer needs a map", errno.EINVAL)
        super().__init__(high_water)
        self._full = False
        self._cb = _SAMPLE_FN(self._on_sample)  # keep a reference: libbpf holds the pointer
        self._where = ", ".join(m.name for m in maps)
        ctypes.set_errno(0)
        rb = _rb_new(maps[0].fd, self._cb, None, None)
        self._ptr: int | None = _ptr(rb, "ring_buffer__new", self._where)
        for m in maps[1:]:
            _check(_rb_add(self._ptr, m.fd, self._cb, None), "ring_buffer__add", m.name)

    def _on_sample(self, _ctx: int | None, data: int, size: int) -> int:
        rec = ctypes.string_at(data, size)
        self.pending[rec[0]] += rec
        self.held += size
        if self.held >= self.high_water:
            self._full = True
            return -1  # libbpf has already consumed this sample; stop the loop here
        return 0

    def _done(self, ret: int, what: str) -> int:
        full, self._full = self._full, False
        if ret < 0 and not (full or ret == -errno.EINTR):
            raise BpfError(what, ret, self._where)
        return max(ret, 0)

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records; returns how many were taken (0 if stopped at high water)."""
        return self._done(_rb_poll(self._require(), timeout_ms), "ring_buffer__poll")

    def consume(self) -> int:
        """Take whatever is available now, without waiting."""
        return self._done(_rb_consume(self._require()), "ring_buffer__consume")

    def _require(self) -> int:
        if not self._ptr:
            raise BpfError("ring buffer is closed", errno.EBADF, self._where)
        return self._ptr

    def close(self) -> None:
        if self._ptr:
            _rb_free(self._ptr)
            self._ptr = None


def ensure_bpffs(path: Path = Path("/sys/fs/bpf")) -> None:
    """Mount the BPF filesystem at `path` unless one is already there (pins need it)."""
    with open("/proc/mounts") as f:
        if any(line.split()[1:3] == [str(path), "bpf"] for line in f):
            return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    path.mkdir(parents=True, exist_ok=True)
    if libc.mount(b"bpf", str(path).encode(), b"bpf", 0, None) != 0:
        raise BpfError(f"mount bpffs at {path}", ctypes.get_errno())
