"""The sandbox's inside: jailer → init → worker (aha/tasks/sandbox.py is the caller's side and says how
it works; docs/sandbox.md what it guarantees).

This file runs as a script, `python -I -S jail.py`, in a new session with an empty environment: it
reads the request on stdin, unshares the namespaces, forks init (pid 1 of the new pid namespace: the
private mounts, rlimits, its own uid, no_new_privs, the seccomp filter) and init forks the worker that
runs the model's code. It imports the standard library only: nothing of aha, nothing from site-packages.
"""

import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import traceback

UID_BASE = 2_000_000_000  # + jailer pid (< 2**22): below 2**31, far above any real account
_WORKDIR_IN_NAMESPACE = "/tmp/work"
_SHARED_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock")  # world-writable dirs: the private /tmp covers them
_SETUP_FAILED = 125
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 4, 38, 22, 2
CLONE_NEWTIME, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x80, 0x2000000, 0x4000000
# clone()'s low byte is the exit signal, so CLONE_NEWTIME (0x80) only means a namespace for unshare()
_CLONE_NAMESPACES = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)
# per architecture: (AUDIT_ARCH_*, syscall numbers of unshare, clone, clone3, setns)
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 272, 56, 435, 308), "aarch64": (0xC00000B7, 97, 220, 435, 268)}


def _jailer():
    """Unshare namespaces (still privileged), fork init, and exit with init's status."""
    request = json.loads(sys.stdin.buffer.read())
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    features = {"uid": root, "userns": not root and _enter_user_namespace(libc)}
    for name, flag in (("net", CLONE_NEWNET), ("mount", CLONE_NEWNS), ("pid", CLONE_NEWPID), ("ipc", CLONE_NEWIPC)):
        features[name] = libc.unshare(flag) == 0
    uid = UID_BASE + os.getpid() if root else None  # the caller computes the same from its Popen
    init = os.fork()
    if init == 0:
        try:
            _init(request, libc, features, uid)
        except BaseException:
            traceback.print_exc()
        os._exit(_SETUP_FAILED)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGKILL))  # the caller's "stop"
    os._exit(_exit_code(os.waitpid(init, 0)[1]))


def _enter_user_namespace(libc):
    """Without root: a user namespace lends the capabilities the other namespaces need."""
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER) != 0:
        return False
    for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{path}", "w") as f:
            f.write(text)
    return True


def _init(request, libc, features, uid):
    """Mount, limit, drop privileges, then run the worker and reap every orphan until it ends."""
    workdir = _private_mounts(libc, request, features, uid) if features["mount"] else request["workdir"]
    if uid is not None:
        os.chown(workdir, uid, uid)
    os.chdir(workdir)
    os.environ["HOME"] = workdir
    _set_limits(request, count_processes=features["uid"] or features["userns"])
    if uid is not None:  # from root: capabilities go with the uid, and the process becomes non-dumpable
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif features["userns"]:  # keep our uid, shed the capabilities the user namespace lent us
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries (su, sudo, mount) grant nothing
    features["seccomp"] = _refuse_new_namespaces(libc)  # after no_new_privs, which an unprivileged filter needs
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # test processes cannot ptrace the harness or open its fds
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it: jailer killed => we die
    features["python"] = os.access(os.path.dirname(os.__file__), os.R_OK | os.X_OK)  # the stdlib, for imports
    os.write(request["report_fd"], f"ready {json.dumps(features)}\n".encode())
    worker = os.fork()
    if worker == 0:
        _worker(request, features)
    os.close(request["report_fd"])  # only the worker reports from here on
    while True:  # as pid 1 we inherit every orphan of the namespace and must reap it
        pid, status = os.wait()
        if pid == worker:
            os._exit(_exit_code(status))


def _private_mounts(libc, request, features, uid):
    """A private /tmp (also over the other world-writable dirs) and /proc; the Python install stays visible,
    even when it lives under one of the dirs the private /tmp hides (a venv in /tmp)."""
    pythons = {os.path.realpath(path): os.open(path, os.O_PATH) for path in sorted(request["pythons"], key=len)}
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing below may propagate to the host
    size, inodes = 16 * request["max_file_bytes"], 1024
    _mount(libc, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},nr_inodes={inodes},mode=1777")
    for path in filter(os.path.isdir, _SHARED_WRITABLE):
        _mount(libc, "/tmp", path, None, MS_BIND)
    for path, fd in pythons.items():  # hidden under our /tmp, or behind a 0700 dir such as /root for the new uid
        if not os.path.isdir(path) or (uid is not None and not _traversable(path)):
            closed = _first_closed_parent(path) if uid is not None else None
            if closed:  # an empty tmpfs hides the rest of that dir (e.g. /root/.ssh) and lets us rebuild the path
                _mount(libc, "tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
            os.makedirs(path, mode=0o755, exist_ok=True)  # under our tmpfs: rebuilt, open to the new uid
            _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    try:  # a /proc of our pid namespace hides the host's processes; some containers refuse it
        _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        features["proc"] = features["pid"]
    except OSError:
        features["proc"] = False
    os.mkdir(_WORKDIR_IN_NAMESPACE)
    return _WORKDIR_IN_NAMESPACE


def _ancestors(path):
    """'/a/b/c' → ['/', '/a', '/a/b'], outermost first."""
    parents = [os.path.dirname(path)]
    while parents[-1] != "/":
        parents.append(os.path.dirname(parents[-1]))
    return parents[::-1]


def _first_closed_parent(path):
    """The outermost existing ancestor that others may not traverse (no o+x), or None. Ancestors that
    no longer exist (hidden by our /tmp) are rebuilt open, so they need no cover."""
    for parent in _ancestors(path):
        if not os.path.isdir(parent):
            return None
        if not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def _traversable(path):
    return all(os.stat(parent).st_mode & 0o001 for parent in _ancestors(path) if os.path.isdir(parent))


def _refuse_new_namespaces(libc):
    """A seccomp filter: unshare() and clone() with any namespace flag, setns() and foreign-ABI syscalls
    fail with EPERM, and clone3() (whose flags sit in memory a filter cannot read) with ENOSYS, so that
    libc falls back to clone(). Sandboxed code can then no longer make a user namespace, which would
    open kernel paths (mounts, netfilter, …) that the uid and no_new_privs otherwise keep shut.
    Returns False on an architecture this filter does not know or a kernel without seccomp."""
    import errno
    import platform
    if platform.machine() not in _SECCOMP_ARCH:
        return False
    arch, unshare, clone, clone3, setns = _SECCOMP_ARCH[platform.machine()]
    load_word, jump_eq, jump_set, jump_ge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, deny, no_syscall = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    # (code, jump if true, jump if false, k); seccomp_data: nr at 0, arch at 4, args[0] (low word) at 16
    program = [  # jumps are relative: a jump of j from instruction i lands on i + 1 + j
        (load_word, 0, 0, 4), (jump_eq, 1, 0, arch), (ret, 0, 0, deny),        # 0-2: another ABI (i386, …)
        (load_word, 0, 0, 0), (jump_ge, 0, 1, 0x40000000), (ret, 0, 0, deny),  # 3-5: x32 syscalls on x86_64
        (jump_eq, 4, 0, unshare), (jump_eq, 5, 0, clone),                      # 6-7: → 11, → 13
        (jump_eq, 6, 0, clone3), (jump_eq, 7, 0, setns), (ret, 0, 0, allow),   # 8-10: → 15, → 17
        (load_word, 0, 0, 16), (jump_set, 4, 3, _CLONE_NAMESPACES | CLONE_NEWTIME),  # 11-12 unshare: → 17 / 16
        (load_word, 0, 0, 16), (jump_set, 2, 1, _CLONE_NAMESPACES),            # 13-14 clone: → 17 / 16
        (ret, 0, 0, no_syscall), (ret, 0, 0, allow), (ret, 0, 0, deny),        # 15-17
    ]
    filters = (_SockFilter * len(program))(*[_SockFilter(*instruction) for instruction in program])
    fprog = _SockFprog(len(program), filters)
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _mount(libc, source, target, fstype, flags, data=None):
    encode = lambda text: text.encode() if text else None
    if libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def _set_limits(request, count_processes):
    cpu, memory, file_size = request["cpu_s"], request["memory_bytes"], request["max_file_bytes"]
    limits = [(resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
              (resource.RLIMIT_AS, memory, memory), (resource.RLIMIT_FSIZE, file_size, file_size),
              (resource.RLIMIT_NOFILE, 64, 64), (resource.RLIMIT_CORE, 0, 0)]
    if count_processes:  # RLIMIT_NPROC counts all processes of the uid: only meaningful for a uid of our own
        limits.append((resource.RLIMIT_NPROC, request["max_procs"], request["max_procs"]))
    for limit, soft, hard in limits:
        resource.setrlimit(limit, (soft, hard))


def _worker(request, features):
    code = 1
    try:
        if not features["net"]:
            _block_sockets()
        if request["mode"] == "tests":
            code = _run_all_tests(request, features)
        else:
            os.close(request["report_fd"])
            code = _run_script(request["code"])
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _block_sockets():
    """Fallback when no network namespace is granted: stops casual use of `socket`, not a determined program."""
    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")
    socket.socket = socket.create_connection = socket.SocketType = refuse


def _run_script(code):
    try:
        exec(compile(code, "<solution>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        return 0
    except SystemExit as stop:  # what the interpreter would do with it
        if stop.code is None or isinstance(stop.code, int):
            return (stop.code or 0) & 0xFF
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def _run_all_tests(request, features):
    report_fd = request["report_fd"]
    for index, test in enumerate(request["tests"]):
        token = os.urandom(16)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os.close(report_fd)
            _run_one_test(request["code"], test, token, write_end)
        os.close(write_end)
        os.waitpid(pid, 0)
        # Poll, not read: a leftover grandchild may hold the write end open.
        answer = os.read(read_end, 64) if select.select([read_end], [], [], 0)[0] else b""
        os.close(read_end)
        os.write(report_fd, f"test {index} {int(answer == token)}\n".encode())
        try:  # this test's leftovers must not eat the next test's processes or CPU; in a pid namespace,
            # kill(-1) reaches every process in it but init and us, even those that left the process group
            os.kill(-1, signal.SIGKILL) if features["pid"] else os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    return 0


def _run_one_test(solution, test, token, write_end):
    os.setpgid(0, 0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # nothing the solution prints can be mistaken for a result
        os.dup2(null, fd)
    try:
        scope = {"__name__": "__main__", "__builtins__": __builtins__}
        exec(compile(solution, "<solution>", "exec"), scope)
        exec(compile(test, "<test>", "exec"), scope)
        os.write(write_end, token)
    except BaseException:
        pass
    os._exit(0)


def _exit_code(status):
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    _jailer()
