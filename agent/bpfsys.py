"""Thin access to BPF objects through libbpf: pinned maps, map elements, test runs.

Used by the loader (on the maps bcc created), by the CLI (on pinned maps, without
compiling anything) and by the tests (BPF_PROG_TEST_RUN).
"""

from __future__ import annotations

import ctypes as C
import ctypes.util
import errno
import os
import shutil
import struct
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


def clear_directory(path: str) -> bool:
    """Remove a directory tree (a pin root, or the state directory); a mount point (the
    directory a pod was given with a hostPath, or a bpffs of its own) is emptied instead,
    as it cannot be removed from inside. Returns whether anything was there."""
    if not os.path.lexists(path):
        return False
    if os.path.ismount(path):
        for name in os.listdir(path):
            child = os.path.join(path, name)
            if os.path.isdir(child) and not os.path.islink(child):
                shutil.rmtree(child)
            else:
                os.unlink(child)
    else:
        shutil.rmtree(path)  # bpffs: unlinking a pin releases it; empty dirs rmdir
    return True


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

    def count(self, batch: int = 1024) -> int:
        """The entries of a hash map, read in batches (BPF_MAP_LOOKUP_BATCH). Unlike a
        get_next_key walk, which starts again from the first bucket when the key it
        stands on is deleted (an LRU table evicting as it is read), a batch read goes
        bucket by bucket: while entries come and go it is off by those, never more."""
        fn = lib().bpf_map_lookup_batch
        fn.restype = C.c_int
        fn.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_void_p, C.c_void_p,
                       C.POINTER(C.c_uint32), C.c_void_p]
        token = max(self.key_size, 8)  # the batch cursor (a bucket number for hashes)
        cursor_in, cursor_out = C.create_string_buffer(token), C.create_string_buffer(token)
        total, first = 0, True
        while True:
            keys = C.create_string_buffer(self.key_size * batch)
            values = C.create_string_buffer(len(self._vbuf()) * batch)
            n = C.c_uint32(batch)
            rc = fn(self.fd, None if first else cursor_in, cursor_out, keys, values,
                    C.byref(n), None)
            err = C.get_errno() if rc < 0 else 0
            if rc < 0 and err == errno.ENOSPC and n.value == 0:
                batch *= 2  # one bucket holds more entries than a batch
                continue
            total += n.value
            if rc < 0:
                if err == errno.ENOENT:
                    return total
                _check(rc, "map batch lookup")
            first = False
            C.memmove(cursor_in, cursor_out, token)

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


# ---------------------------------------------------------------------------- tcx links
# Debian 12's libbpf (1.1) predates tcx (Linux 6.6), and bcc and pyroute2 have no API
# for it: the few commands are made here with the raw bpf(2) system call. The layouts of
# union bpf_attr's members are those of include/uapi/linux/bpf.h.
_NR_BPF = 321  # x86_64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_DETACH = 34
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3  # with no relative program: the head of the chain
BPF_F_AFTER = 1 << 4  # with no relative program: the tail
BPF_LINK_TYPE_TCX = 11
TCX_NEXT = -1  # = TC_ACT_UNSPEC: the rest of the chain (and legacy tc) runs


_libc = C.CDLL(None, use_errno=True)
_libc.syscall.restype = C.c_long


def _bpf(cmd: int, attr: C.Structure, what: str) -> int:
    rc = _libc.syscall(C.c_long(_NR_BPF), C.c_int(cmd), C.byref(attr),
                       C.c_uint(C.sizeof(attr)))
    if rc < 0:
        err = C.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


class _LinkCreateTcx(C.Structure):
    _fields_ = [("prog_fd", C.c_uint32), ("target_ifindex", C.c_uint32),
                ("attach_type", C.c_uint32), ("flags", C.c_uint32),
                ("relative_fd_or_id", C.c_uint32), ("pad", C.c_uint32),
                ("expected_revision", C.c_uint64)]


class _LinkUpdate(C.Structure):
    _fields_ = [("link_fd", C.c_uint32), ("new_prog_fd", C.c_uint32), ("flags", C.c_uint32),
                ("old_prog_fd", C.c_uint32)]


class _LinkDetach(C.Structure):
    _fields_ = [("link_fd", C.c_uint32)]


class _ById(C.Structure):
    _fields_ = [("id", C.c_uint32), ("next_id", C.c_uint32), ("open_flags", C.c_uint32)]


class _InfoByFd(C.Structure):
    _fields_ = [("bpf_fd", C.c_uint32), ("info_len", C.c_uint32), ("info", C.c_uint64)]


class _ProgQuery(C.Structure):
    _fields_ = [("target_ifindex", C.c_uint32), ("attach_type", C.c_uint32),
                ("query_flags", C.c_uint32), ("attach_flags", C.c_uint32),
                ("prog_ids", C.c_uint64), ("count", C.c_uint32), ("pad", C.c_uint32),
                ("prog_attach_flags", C.c_uint64), ("link_ids", C.c_uint64),
                ("link_attach_flags", C.c_uint64), ("revision", C.c_uint64)]


class LinkInfo(C.Structure):
    """The head of struct bpf_link_info with its tcx member (ifindex 0: the device is
    gone, the link is defunct)."""

    _fields_ = [("type", C.c_uint32), ("id", C.c_uint32), ("prog_id", C.c_uint32),
                ("pad", C.c_uint32), ("ifindex", C.c_uint32), ("attach_type", C.c_uint32),
                ("rest", C.c_uint8 * 48)]


class _ProgInfoNamed(C.Structure):
    _fields_ = [*_ProgInfo._fields_, ("name", C.c_char * 16)]


def tcx_attach(prog_fd: int, ifindex: int, attach_type: int,
               flags: int = BPF_F_BEFORE) -> int:
    """A tcx link of the program on the interface (in the calling thread's network
    namespace), by default at the head of the chain; returns the link's fd."""
    attr = _LinkCreateTcx(prog_fd=prog_fd, target_ifindex=ifindex, attach_type=attach_type,
                          flags=flags)
    return _bpf(BPF_LINK_CREATE, attr, f"tcx attach to ifindex {ifindex}")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Replace the link's program in place (atomically: no packet sees neither)."""
    _bpf(BPF_LINK_UPDATE, _LinkUpdate(link_fd=link_fd, new_prog_fd=prog_fd), "link update")


def link_detach(link_fd: int) -> None:
    """Detach the link now, even while pins or other fds still hold it."""
    _bpf(BPF_LINK_DETACH, _LinkDetach(link_fd=link_fd), "link detach")


def link_info(link_fd: int) -> LinkInfo:
    info = LinkInfo()
    attr = _InfoByFd(bpf_fd=link_fd, info_len=C.sizeof(info), info=C.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "link info")
    return info


def prog_name(prog_id_: int) -> str:
    """The name of a loaded program by id ('' when it is gone)."""
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, _ById(id=prog_id_), "prog by id")
    except BpfError:
        return ""
    try:
        info = _ProgInfoNamed()
        attr = _InfoByFd(bpf_fd=fd, info_len=C.sizeof(info), info=C.addressof(info))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "prog info")
        return info.name.decode(errors="replace")
    finally:
        os.close(fd)


def tcx_query(ifindex: int, attach_type: int) -> tuple[list[int], list[int], int]:
    """The tcx chain of an interface in one direction, head first: (program ids, link
    ids, revision). Raises BpfError EINVAL on a kernel without tcx."""
    for size in (16, 64, 1024):
        progs, links = (C.c_uint32 * size)(), (C.c_uint32 * size)()
        attr = _ProgQuery(target_ifindex=ifindex, attach_type=attach_type,
                          prog_ids=C.addressof(progs), link_ids=C.addressof(links),
                          count=size)
        try:
            _bpf(BPF_PROG_QUERY, attr, f"tcx query of ifindex {ifindex}")
        except BpfError as e:
            if e.errno == errno.ENOSPC:
                continue
            raise
        n = attr.count
        return list(progs[:n]), list(links[:n]), attr.revision
    raise BpfError(errno.ENOSPC, f"tcx query of ifindex {ifindex}: more than 1024 programs")


def tcx_supported() -> bool:
    """Whether the kernel has tcx: asked by querying the loopback's chain (ifindex 1
    exists in every network namespace)."""
    try:
        tcx_query(1, BPF_TCX_INGRESS)
    except BpfError:
        return False
    return True


# ---------------------------------------------------------------------------- tiny programs
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_FUNC_tail_call = 12
SKB_CB_OFFSET = 48  # offsetof(struct __sk_buff, cb)


class _ProgLoad(C.Structure):
    _fields_ = [("prog_type", C.c_uint32), ("insn_cnt", C.c_uint32), ("insns", C.c_uint64),
                ("license", C.c_uint64), ("log_level", C.c_uint32), ("log_size", C.c_uint32),
                ("log_buf", C.c_uint64), ("kern_version", C.c_uint32),
                ("prog_flags", C.c_uint32), ("prog_name", C.c_char * 16)]


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def tail_call_stub(prog_array_fd: int, cb_index: int, value: int,
                   name: str = "cn2m_stub") -> int:
    """Load a SCHED_CLS program of five instructions that writes `value` into
    skb->cb[cb_index] and tail-calls prog_array[0] (TCX_NEXT if that is empty). It gives
    a shared program a per-attachment constant with no compiler: the pod-side
    attachment passes the pod's host-side ifindex this way. Returns the program's fd."""
    code = b"".join([
        _insn(0x62, dst=1, off=SKB_CB_OFFSET + 4 * cb_index, imm=value),  # *(u32 *)
        _insn(0x18, dst=2, src=1, imm=prog_array_fd), _insn(0),  # r2 = map (fd)
        _insn(0xB7, dst=3, imm=0),  # r3 = 0
        _insn(0x85, imm=BPF_FUNC_tail_call),
        _insn(0xB7, dst=0, imm=TCX_NEXT),
        _insn(0x95),  # exit
    ])
    insns = C.create_string_buffer(code, len(code))
    lic = C.create_string_buffer(b"GPL")
    log = C.create_string_buffer(4096)
    attr = _ProgLoad(prog_type=BPF_PROG_TYPE_SCHED_CLS, insn_cnt=len(code) // 8,
                     insns=C.addressof(insns), license=C.addressof(lic), log_level=1,
                     log_size=len(log), log_buf=C.addressof(log),
                     prog_name=name.encode()[:15])
    try:
        return _bpf(BPF_PROG_LOAD, attr, "loading a tail-call stub")
    except BpfError as e:
        raise BpfError(e.errno, f"{e.strerror}: {log.value.decode(errors='replace')[-300:]}"
                       ) from e
