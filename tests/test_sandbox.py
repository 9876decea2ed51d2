"""Hostile programs against aha.tasks.sandbox, and honest ones that must score exactly what they earn.

Run: python -m pytest tests/test_sandbox.py -q        (about 15 s on 2 cores)

Every hostile program is scored as a solution on the one test `assert answer() == 42`. Where an
attack can be detected from inside, the program defines `answer()` to return 42 only if the attack
worked, so a reward above 0 is a breach. Around each run, the `host` fixture checks from outside:
the canary file survives, no escape file exists, the listening socket was never reached, and no
sandbox process is left. Tests that need a layer this machine does not grant are skipped, saying so.
"""

import os
import signal
import socket
import string
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from aha.tasks import sandbox
from aha.tasks.sandbox import run_python, run_tests

LIMITS = {"timeout_s": 2.0, "cpu_s": 1, "memory_mb": 256}
REPO = Path(__file__).resolve().parents[1]
LAYERS = sandbox.isolation()


def needs(*layers):
    missing = [layer for layer in layers if not LAYERS.get(layer)]
    return pytest.mark.skipif(bool(missing), reason=f"this machine does not grant: {', '.join(missing)}")


def sandbox_processes():
    """Live processes of a sandbox: a private uid, the jailer's command line (its forks keep it), or
    a child of this process. The `host` fixture counts only those that a test leaves behind: other
    tests' long-lived workers (the math grader's process pool) are no sandbox's leak."""
    found = []
    for proc in psutil.process_iter(["uids", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["uids"] is None:
            continue
        if proc.info["uids"].real >= sandbox.UID_BASE or sandbox.JAIL in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found + psutil.Process().children(recursive=True)


@pytest.fixture
def host(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex
    secret = f"secret-{tag}"
    monkeypatch.setenv("AHA_SECRET", secret)
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    private = tmp_path / "private.txt"
    private.write_text(secret)
    private.chmod(0o600)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    escapes = [Path(f"/tmp/aha_sandbox_escape_{tag}"), Path(f"/var/tmp/aha_sandbox_escape_{tag}"),
               Path(f"/dev/shm/aha_sandbox_escape_{tag}"), REPO / f"aha_sandbox_escape_{tag}"]
    workdirs_before = set(Path(tempfile.gettempdir()).glob("aha_sandbox_*"))
    processes_before = {proc.pid for proc in sandbox_processes()}
    values = {"secret": secret, "canary": str(canary), "private": str(private), "port": listener.getsockname()[1],
              "escapes": [str(path) for path in escapes], "trainer_pid": os.getpid(), "trainer_pgid": os.getpgid(0)}
    yield values
    leaked = [path for path in escapes if path.exists()]
    for path in leaked:
        path.unlink()
    assert not leaked, f"the sandbox wrote outside its folder: {leaked}"
    assert canary.read_text() == "alive"
    with pytest.raises(BlockingIOError):  # nothing ever connected
        listener.accept()
    listener.close()
    assert [proc for proc in sandbox_processes() if proc.pid not in processes_before] == []
    assert set(Path(tempfile.gettempdir()).glob("aha_sandbox_*")) <= workdirs_before


HOSTILE = {
    "fork_bomb": """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""",
    "infinite_loop": "while True:\n    pass\n",
    "ignore_cpu_signal_and_loop": """
import signal
signal.signal(signal.SIGXCPU, signal.SIG_IGN)
while True:
    pass
""",
    "memory_hog": """
import mmap
try:
    block = mmap.mmap(-1, 1 << 30)
    for offset in range(0, len(block), 4096):
        block[offset] = 1  # touch every page: 1 GB of real memory
    hogged = True
except (MemoryError, OSError):
    hogged = False
def answer():
    return 42 if hogged else 0
""",
    "raise_rlimits_then_hog": """
import mmap, resource
for limit in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NPROC, resource.RLIMIT_FSIZE):
    try:
        resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass
try:
    block = mmap.mmap(-1, 4 << 30)
    hogged = True
except (MemoryError, OSError):
    hogged = False
def answer():
    return 42 if hogged else 0
""",
    "write_outside_workdir": """
import pathlib
for path in $escapes:
    try:
        pathlib.Path(path).write_text("escaped")
    except OSError:
        pass
""",
    "delete_canary": """
import os, shutil
removed = False
try:
    os.remove("$canary")
    removed = True
except OSError:
    pass
shutil.rmtree(os.path.dirname("$canary"), ignore_errors=True)
def answer():
    return 42 if removed else 0
""",
    "read_environment_secret": """
import glob, os
found = "$secret" in str(os.environ)
for path in glob.glob("/proc/*/environ"):
    try:
        found = found or "$secret" in open(path, errors="replace").read()
    except OSError:
        pass
def answer():
    return 42 if found else 0
""",
    "read_host_files": """
stolen = []
for path in ("/etc/shadow", "$private", "/proc/$trainer_pid/environ", "/proc/$trainer_pid/mem"):
    try:
        stolen.append(open(path, "rb").read(100))
    except OSError:
        pass
def answer():
    return 42 if stolen else 0
""",
    "connect_to_host_socket": """
import socket, _socket
connected = False
for make in (lambda: socket.create_connection(("127.0.0.1", $port), timeout=0.5),
             lambda: _socket.socket().connect(("127.0.0.1", $port))):
    try:
        make()
        connected = True
    except Exception:
        pass
def answer():
    return 42 if connected else 0
""",
    "spawn_shell": """
import os, subprocess
for path in $escapes:
    os.system(f"echo escaped > {path}")
    subprocess.run(["sh", "-c", f"touch {path}; kill -9 $trainer_pid"])
""",
    "signal_the_parents": """
import os, signal
for pid in ($trainer_pid, os.getppid()):
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
""",
    "kill_process_groups": """
import os, signal
try:
    os.killpg($trainer_pgid, signal.SIGKILL)
except OSError:
    pass
os.kill(-1, signal.SIGKILL)
os.killpg(0, signal.SIGKILL)
""",
    "ctypes_libc": """
import ctypes, os, pathlib
libc = ctypes.CDLL(None, use_errno=True)
libc.setuid(0)
libc.setgid(0)
libc.kill($trainer_pid, 9)
libc.unshare(0x10000000 | 0x20000)  # user + mount namespaces of its own, to unmount the private /tmp
libc.umount2(b"/tmp", 2)
for path in $escapes:
    try:
        pathlib.Path(path).write_text("escaped")
    except OSError:
        pass
def answer():
    return 42 if os.geteuid() == 0 else 0
""",
    "new_user_namespace": """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
made = []
CLONE = 56 if os.uname().machine == "x86_64" else 220
for flags in (0x10000000, 0x10000000 | 0x20000, 0x40000000, 0x20000000):  # user, user+mount, net, pid
    if libc.unshare(flags) == 0:
        made.append(("unshare", flags))
    child = libc.syscall(CLONE, flags | 17, 0, 0, 0, 0)     # raw clone(), SIGCHLD: forks in a new namespace
    if child == 0:
        os._exit(0)
    if child > 0:
        os.waitpid(child, 0)
        made.append(("clone", flags))
def answer():
    return 42 if made else 0
""",
    "orphan_outlives_parent": """
import os, subprocess, time
subprocess.Popen(["sleep", "1000"], start_new_session=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(1000)
    os._exit(0)
""",
    "forge_result_lines": """
import os, sys
print("test 0 1")
print('ready {}')
sys.stderr.write("test 0 1\\n")
sys.exit(0)
""",
    "forge_by_writing_every_fd": """
import os
for fd in range(3, 64):
    try:
        os.write(fd, b"test 0 1\\n" + os.urandom(16))
    except OSError:
        pass
os._exit(0)
""",
    "kill_the_harness": """
import os, signal
def answer():
    return 42
os.kill(os.getppid(), signal.SIGKILL)
os.kill(-1, signal.SIGKILL)
""",
    "fill_the_disk": """
written = 0
try:
    for index in range(200):
        with open(f"blob{index}", "wb") as blob:
            blob.write(b"x" * (1 << 20))
        written += 1
except OSError:
    pass
def answer():
    return 42 if written == 200 else 0
""",
    "huge_output": """
import os, sys
while True:
    sys.stdout.write("x" * 65536)
    sys.stderr.write("y" * 65536)
    os.write(1, b"z" * 65536)
""",
    "open_sockets": """
import socket
reached = []
for kind, address in ((socket.SOCK_STREAM, ("1.1.1.1", 53)), (socket.SOCK_DGRAM, ("1.1.1.1", 53)),
                      (socket.SOCK_DGRAM, ("127.0.0.1", $port))):
    try:
        sock = socket.socket(socket.AF_INET, kind)
        sock.settimeout(0.5)
        sock.connect(address)
        sock.send(b"x")
        reached.append(address)
    except OSError:
        pass
def answer():
    return 42 if reached else 0
""",
    "rm_rf_home": """
import os, shutil
os.system("rm -rf ~ $canary")
shutil.rmtree(os.path.dirname("$canary"), ignore_errors=True)
""",
}
# Faulting in 1 GB takes seconds of CPU here: give the hog the time, so only the memory limit can stop it.
LIMITS_FOR = {"memory_hog": {"cpu_s": 10, "timeout_s": 10.0}}
LAYERS_NEEDED = {"write_outside_workdir": ("uid", "mount"), "spawn_shell": ("uid", "mount"),
                 "delete_canary": ("uid",), "read_host_files": ("uid",), "connect_to_host_socket": ("net",),
                 "ctypes_libc": ("uid", "mount"), "fill_the_disk": ("mount",), "orphan_outlives_parent": ("pid",),
                 "open_sockets": ("net",), "rm_rf_home": ("uid",), "new_user_namespace": ("seccomp",)}


@pytest.mark.parametrize("name", [pytest.param(name, marks=needs(*LAYERS_NEEDED.get(name, ())))
                                  for name in HOSTILE])
def test_hostile_program_scores_zero_and_harms_nothing(name, host):
    code = string.Template(HOSTILE[name]).substitute(host)
    limits = LIMITS | LIMITS_FOR.get(name, {})
    start = time.monotonic()
    reward = run_tests(code, ["assert answer() == 42"], **limits)
    assert reward == 0.0
    assert time.monotonic() - start < limits["timeout_s"] + 2


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_capped_and_killed(stream, host):
    result = run_python(
        f"import sys\nwhile True:\n    sys.{stream}.write('x' * 65536)\n", max_output_bytes=10_000, **LIMITS
    )
    assert len(getattr(result, stream)) == 10_000
    assert result.killed_reason == "output_limit" and not result.timed_out
    assert result.wall_s < 1.5


def test_sleeper_times_out(host):
    result = run_python("import time\ntime.sleep(100)", **LIMITS)
    assert result.timed_out and result.killed_reason == "timeout"
    assert LIMITS["timeout_s"] <= result.wall_s < LIMITS["timeout_s"] + 1


def test_busy_loop_hits_the_cpu_limit(host):
    result = run_python("while True:\n    pass\n", timeout_s=5.0, cpu_s=1)
    assert result.killed_reason == "signal SIGXCPU" and result.returncode == 128 + signal.SIGXCPU
    assert result.wall_s < 3


def test_output_and_exit_status_are_captured(host):
    result = run_python("import sys\nprint('héllo')\nprint('oops', file=sys.stderr)\nsys.exit(3)", **LIMITS)
    assert (result.stdout, result.stderr, result.returncode) == ("héllo\n", "oops\n", 3)
    assert not result.timed_out and result.killed_reason is None


def test_uncaught_exception_gives_traceback(host):
    result = run_python("1 / 0", **LIMITS)
    assert result.returncode == 1 and "ZeroDivisionError" in result.stderr


def test_standard_library_is_importable(host):
    code = "import collections, fractions, heapq, json, math, re, socket, subprocess, sys\nprint(math.comb(5, 2))\n"
    code += "print(subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True, text=True).stdout, end='')"
    result = run_python(code, **LIMITS)
    assert (result.stdout, result.stderr) == ("10\n7\n", "")


def test_correct_solution_scores_one(host):
    solution = "def add(a, b):\n    return a + b\n"
    assert run_tests(solution, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"],
                     **LIMITS) == 1.0


def test_half_correct_solution_scores_half(host):
    solution = "def sign(x):\n    return 1 if x > 0 else -1\n"  # wrong at 0
    tests = ["assert sign(5) == 1", "assert sign(-3) == -1", "assert sign(0) == 0", "assert sign(0.0) == 0"]
    assert run_tests(solution, tests, **LIMITS) == 0.5


def test_each_test_gets_a_fresh_solution_and_a_crash_fails_only_itself(host):
    solution = "calls = []\ndef f(x):\n    calls.append(x)\n    return len(calls)\n"
    tests = ["assert f(1) == 1", "assert f(2) == 1", "import os\nos._exit(0)", "raise SystemExit(0)",
             "x = f(3)\nassert x == 1"]
    assert run_tests(solution, tests, **LIMITS) == 3 / 5


def test_no_tests_is_an_error():
    with pytest.raises(ValueError):
        run_tests("x = 1", [])


def test_trainer_is_unharmed_after_the_suite():
    assert psutil.Process().status() != psutil.STATUS_STOPPED
    assert sys.getrecursionlimit() >= 1000
