# Writers that reach a file without the syscalls doppel's sys_exit program decodes,
# for tests (run as a prefix of `python3 -c`): `aio_write` through Linux native AIO
# (`io_submit`, buffered or O_DIRECT) and `write32` through the 32-bit `int 0x80`
# entry, from machine code placed in a page below 4 GiB (MAP_32BIT).
import ctypes, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
L = ctypes.c_long

class Iocb(ctypes.Structure):
    _fields_ = [('data', ctypes.c_uint64), ('key', ctypes.c_uint32), ('rw_flags', ctypes.c_int32),
                ('opcode', ctypes.c_uint16), ('prio', ctypes.c_int16), ('fd', ctypes.c_uint32),
                ('buf', ctypes.c_uint64), ('nbytes', ctypes.c_uint64), ('offset', ctypes.c_int64),
                ('res2', ctypes.c_uint64), ('flags', ctypes.c_uint32), ('resfd', ctypes.c_uint32)]

def aio_write(path, off, data, direct=False, create=False):
    flags = os.O_WRONLY | (os.O_DIRECT if direct else 0) | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o644)
    buf = mmap.mmap(-1, max(len(data), 4096))
    buf.write(data)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ctx = ctypes.c_ulong(0)
    assert libc.syscall(L(206), L(8), ctypes.byref(ctx)) == 0, 'io_setup'
    cb = Iocb(opcode=1, fd=fd, buf=addr, nbytes=len(data), offset=off)
    cbs = (ctypes.POINTER(Iocb) * 1)(ctypes.pointer(cb))
    assert libc.syscall(L(209), L(ctx.value), L(1), cbs) == 1, 'io_submit'
    ev = (ctypes.c_int64 * 4)()
    assert libc.syscall(L(208), L(ctx.value), L(1), L(1), ev, None) == 1, 'io_getevents'
    assert ev[2] == len(data), ('aio result', ev[2])
    libc.syscall(L(207), L(ctx.value))
    os.close(fd)

def write32(path, off, data):
    fd = os.open(path, os.O_WRONLY)
    os.lseek(fd, off, 0)
    size = 4096 + len(data)
    p = libc.mmap(None, size, 7, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40, -1, 0)
    assert p and p != 2**64 - 1 and p + size < 2**32, 'MAP_32BIT'
    ctypes.memmove(p + 4096, data, len(data))
    le = lambda v: v.to_bytes(4, 'little')
    save = b'\x53\x55\x41\x54\x41\x55\x41\x56\x41\x57'
    restore = b'\x41\x5f\x41\x5e\x41\x5d\x41\x5c\x5d\x5b'
    code = (save + b'\xb8' + le(4) + b'\xbb' + le(fd) + b'\xb9' + le(p + 4096)
            + b'\xba' + le(len(data)) + b'\xcd\x80' + restore + b'\xc3')
    ctypes.memmove(p, code, len(code))
    n = ctypes.CFUNCTYPE(ctypes.c_int)(p)()
    assert n == len(data), ('int 0x80 write', n)
    libc.munmap(ctypes.c_void_p(p), ctypes.c_size_t(size))
    os.close(fd)
