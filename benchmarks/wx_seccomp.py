"""Run a command under systemd 252's MemoryDenyWriteExecute=yes seccomp rules (libseccomp via ctypes).

Usage: python benchmarks/wx_seccomp.py .venv/bin/bikewatch classify photo.jpg
EPERM for mmap(PROT_WRITE|PROT_EXEC), mprotect/pkey_mprotect(PROT_EXEC) and shmat(SHM_EXEC), as
systemd 252 installs them; systemd >= 254 uses the kernel's PR_SET_MDWE instead (./dev bench).
"""
import ctypes
import os
import sys
s = ctypes.CDLL("libseccomp.so.2")
SCMP_ACT_ALLOW = 0x7fff0000
def SCMP_ACT_ERRNO(e: int) -> int:
    return 0x00050000 | (e & 0xffff)
SCMP_CMP_MASKED_EQ = 7
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]
s.seccomp_init.restype = ctypes.c_void_p
s.seccomp_init.argtypes = [ctypes.c_uint32]
s.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
s.seccomp_load.argtypes = [ctypes.c_void_p]
s.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
ctx = s.seccomp_init(SCMP_ACT_ALLOW)
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
def rule(name, arg, mask, val):
    nr = s.seccomp_syscall_resolve_name(name.encode())
    add = s.seccomp_rule_add
    add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, Cmp]
    assert add(ctx, SCMP_ACT_ERRNO(1), nr, 1, Cmp(arg, SCMP_CMP_MASKED_EQ, mask, val)) == 0, name
rule("mmap", 2, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC)
rule("mprotect", 2, PROT_EXEC, PROT_EXEC)
rule("pkey_mprotect", 2, PROT_EXEC, PROT_EXEC)
rule("shmat", 2, SHM_EXEC, SHM_EXEC)
libc = ctypes.CDLL(None)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert s.seccomp_load(ctx) == 0
os.execv(sys.argv[1], sys.argv[1:])
