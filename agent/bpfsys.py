"""Thin access to BPF objects through libbpf: pinned maps, map elements, test runs.

Used by the loader (on the maps bcc created), by the CLI (on pinned maps, without
compiling anything) and by the tests (BPF_PROG_TEST_RUN).
"""

from __future__ import annotations

import ctypes as C
import ctypes.util
import errno
import os
from collections.abc import Iterator

_lib = None


def lib() -> C.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            _lib = C.CDLL(name, use_errno=True)
        except OSError as e:
            raise BpfError(f"libbpf not found ({e}): install Debian's libbpf1") from e
        _lib.bpf_obj_get.argtypes = [C.c_char_p]
        _lib.bpf_obj_pin.argtypes = [C.c_int, C.c_char_p]
        for fn in ("bpf_map_lookup_elem", "bpf_map_update_elem", "bpf_map_delete_elem",
                   "bpf_map_get_next_key"):
            getattr(_lib, fn).restype = C.c_int
        _lib.bpf_map_update_elem.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_uint64]
        _lib.bpf_map_lookup_elem.argtypes = [C.c_int, C.c_void_p, C.c_void_p]
        _lib.bpf_map_delete_elem.argtypes = [C.c_int, C.c_void_p]
        _lib.bpf_map_get_next_key.argtypes = [C.c_int, C.c_void_p, C.c_void_p]
        _lib.bpf_prog_test_run_opts.argtypes = [C.c_int, C.c_void_p]
        _lib.bpf_obj_get_info_by_fd.argtypes = [C.c_int, C.c_void_p, C.POINTER(C.c_uint32)]
        _lib.bpf_map_get_fd_by_id.argtypes = [C.c_uint32]
    return _lib


class BpfError(OSError):
    pass


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = C.get_errno() or -rc
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


def obj_get(path: str) -> int:
    """Open a pinned object; raises FileNotFoundError when nothing is pinned there."""
    fd = lib().bpf_obj_get(path.encode())
    if fd < 0:
        err = C.get_errno()
        if err == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "nothing pinned", path)
        raise BpfError(err, f"bpf_obj_get {path}: {os.strerror(err)}")
    return fd


def obj_pin(fd: int, path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    _check(lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


class MapInfo(C.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [("type", C.c_uint32), ("id", C.c_uint32), ("key_size", C.c_uint32),
                ("value_size", C.c_uint32), ("max_entries", C.c_uint32),
                ("map_flags", C.c_uint32), ("name", C.c_char * 16), ("rest", C.c_uint8 * 64)]


class _ProgInfo(C.Structure):
    """The head of struct bpf_prog_info, up to the ids of the maps the program uses."""

    _fields_ = [("type", C.c_uint32), ("id", C.c_uint32), ("tag", C.c_uint8 * 8),
                ("jited_prog_len", C.c_uint32), ("xlated_prog_len", C.c_uint32),
                ("jited_prog_insns", C.c_uint64), ("xlated_prog_insns", C.c_uint64),
                ("load_time", C.c_uint64), ("created_by_uid", C.c_uint32),
                ("nr_map_ids", C.c_uint32), ("map_ids", C.c_uint64)]


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    size = C.c_uint32(C.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(size)), "map info")
    return info


def prog_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program (what a program array holds, read back)."""
    info = _ProgInfo()
    size = C.c_uint32(C.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, C.byref(info), C.byref(size)), "prog info")
    return info.id


def possible_cpus() -> int:
    """Number of possible CPUs: the size of a per-CPU map value's array."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class BpfMap:
    """A map by fd with raw (bytes) keys and values; per-CPU values come as a list."""

    def __init__(self, fd: int, key_size: int, value_size: int, percpu: bool = False):
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.percpu = percpu
        self._stride = (value_size + 7) // 8 * 8
        self._ncpu = possible_cpus() if percpu else 1
        lib()  # loaded: update() calls it directly

    @classmethod
    def pinned(cls, path: str, key_size: int, value_size: int, percpu: bool = False):
        return cls(obj_get(path), key_size, value_size, percpu)

    def _vbuf(self):
        return C.create_string_buffer(self._stride * self._ncpu if self.percpu else
                                      self.value_size)

    def lookup(self, key: bytes) -> bytes | list[bytes] | None:
        kb = C.create_string_buffer(bytes(key), self.key_size)
        vb = self._vbuf()
        if lib().bpf_map_lookup_elem(self.fd, kb, vb) < 0:
            if C.get_errno() == errno.ENOENT:
                return None
            _check(-C.get_errno(), "map lookup")
        raw = vb.raw
        if self.percpu:
            return [raw[i * self._stride: i * self._stride + self.value_size]
                    for i in range(self._ncpu)]
        return raw

    def update(self, key: bytes, value: bytes) -> None:
        if not self.percpu and type(key) is bytes and type(value) is bytes and \
                len(key) == self.key_size and len(value) == self.value_size:
            # The kernel only reads them: the bytes themselves, no copies (the agent
            # writes thousands of entries when a rule's address set changes).
            _check(_lib.bpf_map_update_elem(self.fd, key, value, 0), "map update")
            return
        kb = C.create_string_buffer(bytes(key), self.key_size)
        if self.percpu:
            vb = C.create_string_buffer(b"".join(
                bytes(value).ljust(self._stride, b"\0") for _ in range(self._ncpu)))
        else:
            vb = C.create_string_buffer(bytes(value), self.value_size)
        _check(lib().bpf_map_update_elem(self.fd, kb, vb, 0), "map update")

    def update_percpu(self, key: bytes, values: list[bytes]) -> None:
        """Write each CPU's own value of a per-CPU map (as lookup() returned them)."""
        if not self.percpu or len(values) != self._ncpu:
            raise ValueError("update_percpu needs a per-CPU map and one value per CPU")
        kb = C.create_string_buffer(bytes(key), self.key_size)
        vb = C.create_string_buffer(b"".join(bytes(v).ljust(self._stride, b"\0")
                                             for v in values))
        _check(lib().bpf_map_update_elem(self.fd, kb, vb, 0), "map update")

    def delete(self, key: bytes) -> bool:
        kb = C.create_string_buffer(bytes(key), self.key_size)
        if lib().bpf_map_delete_elem(self.fd, kb) < 0:
            if C.get_errno() == errno.ENOENT:
                return False
            _check(-C.get_errno(), "map delete")
        return True

    def keys(self) -> Iterator[bytes]:
        prev = None
        nxt = C.create_string_buffer(self.key_size)
        while True:
            rc = lib().bpf_map_get_next_key(self.fd, prev, nxt)
            if rc < 0:
                if C.get_errno() == errno.ENOENT:
                    return
                _check(-C.get_errno(), "map iterate")
            key = nxt.raw
            yield key
            prev = C.create_string_buffer(key, self.key_size)

    def items(self) -> Iterator[tuple[bytes, bytes | list[bytes]]]:
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:
                yield k, v


class _TestRunOpts(C.Structure):
    _fields_ = [
        ("sz", C.c_size_t),
        ("data_in", C.c_void_p),
        ("data_out", C.c_void_p),
        ("data_size_in", C.c_uint32),
        ("data_size_out", C.c_uint32),
        ("ctx_in", C.c_void_p),
        ("ctx_out", C.c_void_p),
        ("ctx_size_in", C.c_uint32),
        ("ctx_size_out", C.c_uint32),
        ("retval", C.c_uint32),
        ("repeat", C.c_int),
        ("duration", C.c_uint32),
        ("flags", C.c_uint32),
        ("cpu", C.c_uint32),
        ("batch_size", C.c_uint32),
    ]


class SkbContext(C.Structure):
    """The writable head of struct __sk_buff that BPF_PROG_TEST_RUN accepts as context."""

    _fields_ = [
        ("len", C.c_uint32), ("pkt_type", C.c_uint32), ("mark", C.c_uint32),
        ("queue_mapping", C.c_uint32), ("protocol", C.c_uint32),
        ("vlan_present", C.c_uint32), ("vlan_tci", C.c_uint32), ("vlan_proto", C.c_uint32),
        ("priority", C.c_uint32), ("ingress_ifindex", C.c_uint32), ("ifindex", C.c_uint32),
        ("tc_index", C.c_uint32), ("cb", C.c_uint32 * 5), ("hash", C.c_uint32),
        ("tc_classid", C.c_uint32), ("data", C.c_uint32), ("data_end", C.c_uint32),
        ("napi_id", C.c_uint32), ("family", C.c_uint32), ("remote_ip4", C.c_uint32),
        ("local_ip4", C.c_uint32), ("remote_ip6", C.c_uint32 * 4),
        ("local_ip6", C.c_uint32 * 4), ("remote_port", C.c_uint32),
        ("local_port", C.c_uint32), ("data_meta", C.c_uint32), ("flow_keys", C.c_uint64),
        ("tstamp", C.c_uint64), ("wire_len", C.c_uint32), ("gso_segs", C.c_uint32),
        ("sk", C.c_uint64), ("gso_size", C.c_uint32), ("tstamp_type", C.c_uint8),
        ("pad", C.c_uint8 * 3), ("hwtstamp", C.c_uint64),
    ]


def test_run(prog_fd: int, packet: bytes, *, ifindex: int = 0, mark: int = 0,
             repeat: int = 1) -> tuple[int, bytes, int]:
    """Run a program once (or `repeat` times) on `packet`: (retval, packet out, ns/run)."""
    data_in = C.create_string_buffer(packet, len(packet))
    data_out = C.create_string_buffer(len(packet) + 512)
    opts = _TestRunOpts(sz=C.sizeof(_TestRunOpts))
    opts.data_in = C.cast(data_in, C.c_void_p)
    opts.data_out = C.cast(data_out, C.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_size_out = len(data_out)
    opts.repeat = repeat
    ctx = None
    if ifindex or mark:
        ctx = SkbContext(ifindex=ifindex, mark=mark)
        opts.ctx_in = C.cast(C.pointer(ctx), C.c_void_p)
        opts.ctx_size_in = C.sizeof(ctx)
    _check(lib().bpf_prog_test_run_opts(prog_fd, C.byref(opts)), "BPF_PROG_TEST_RUN")
    return (C.c_int32(opts.retval).value, data_out.raw[: opts.data_size_out],
            opts.duration)
