"""Run untrusted, model-written Python in a throwaway subprocess, for code-execution rewards.

    from aha.tasks.sandbox import run_python, run_tests
    run_python("print(6 * 7)").stdout                                              # '42\n'
    run_tests("def f(x): return 2 * x", ["assert f(2) == 4", "assert f(3) == 5"])   # 0.5

How: the caller runs aha/tasks/jail.py as `python -I -S` in a new session with an empty environment and
sends the request on stdin. That *jailer* unshares network, mount, pid and ipc namespaces (first a
user namespace when not root) and forks *init*, pid 1 of the new pid namespace, which mounts a
private size-capped tmpfs over /tmp and the other world-writable dirs plus a fresh /proc, sets
rlimits, switches to a uid of its own (as root) and no_new_privs, and forks the *worker* that runs
the code. When the worker ends, init ends and the kernel kills the rest of the namespace; the caller
enforces wall time and output caps, then kills the session and every process of the private uid.
Layers the kernel refuses are skipped, and `isolation()` says which hold. `run_tests` forks one
process per test; a pass is reported on a pipe the test processes close before running model code.
docs/sandbox.md says exactly what is and is not guaranteed.

Departures from the brief: a private uid (`UID_BASE` + jailer pid, unique among live sandboxes,
owning no file) rather than `nobody`, so sandboxes cannot touch each other and "kill every process
of the uid" is exact; setup in a fresh interpreter rather than a `preexec_fn`, which is unsafe in a
multi-threaded trainer; no Python-level restrictions but a socket block when no network namespace
is granted, which any determined program gets around. Security rests on the kernel layers only.
"""

import functools
import inspect
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from aha.tasks.jail import UID_BASE

_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")   # run as a script: python -I -S JAIL


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # the program's exit status; 128 + N when signal N ended it, as a shell reports it
    stdout: str  # first max_output_bytes bytes, decoded with errors="replace"
    stderr: str
    timed_out: bool
    killed_reason: str | None  # "timeout", "output_limit", "signal SIGXCPU" (CPU limit), ... or None
    wall_s: float


def run_python(code: str, *, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512,
               max_output_bytes: int = 65536, max_file_bytes: int = 1 << 20, max_procs: int = 16) -> SandboxResult:
    """Run `code` as a script in the sandbox, with empty stdin. These keyword defaults serve the whole module."""
    limits = {name: value for name, value in locals().items() if name != "code"}
    return _run({"mode": "python", "code": code}, **limits)[0]


_DEFAULT_LIMITS = {
    name: param.default for name, param in inspect.signature(run_python).parameters.items() if name != "code"
}


def run_tests(solution_code: str, tests: list[str], **limits) -> float:
    """Fraction of `tests` (snippets such as "assert f(2) == 4") that pass after `solution_code`.

    Each test runs in its own process on a fresh copy of the solution; all of them share one
    sandbox and its `timeout_s`. A test that has not reported when the time is up counts as failed.
    """
    if not tests:
        raise ValueError("run_tests needs at least one test")
    _, _, report = _run({"mode": "tests", "code": solution_code, "tests": tests}, **_DEFAULT_LIMITS | limits)
    passed = {line for line in report if line.startswith("test ") and line.endswith(" 1")}
    return len(passed) / len(tests)


@functools.cache
def isolation() -> dict[str, bool]:
    """Which layers this machine grants: uid (private uid), userns, net, mount, pid, ipc, proc."""
    return _run({"mode": "python", "code": ""}, **_DEFAULT_LIMITS | {"timeout_s": 30.0})[1]


# ---- caller side -----------------------------------------------------------------------------


def _run(request, timeout_s, cpu_s, memory_mb, max_output_bytes, max_file_bytes, max_procs):
    """Start the jailer, send the request, collect output until exit, deadline or cap; kill and clean up."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aha_sandbox_", ignore_cleanup_errors=True) as workdir:
        report_read, report_write = os.pipe()  # workdir: used only when no mount namespace is granted
        request = request | {
            "workdir": workdir,
            "report_fd": report_write,
            "cpu_s": cpu_s,
            "memory_bytes": memory_mb << 20,
            "max_file_bytes": max_file_bytes,
            "max_procs": max_procs,  # and what to keep visible:
            "pythons": list({sys.base_prefix, sys.prefix, os.path.dirname(sys.executable)}),
        }
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", JAIL], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=_ENV,
                                    start_new_session=True, pass_fds=(report_write,))
        except BaseException:
            os.close(report_read)
            raise
        finally:
            os.close(report_write)
        with proc, open(report_read, "rb", buffering=0) as report_pipe:
            try:
                try:  # the jailer reads all of stdin before anything else runs, so this cannot deadlock
                    proc.stdin.write(json.dumps(request).encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                caps = {proc.stdout.fileno(): max_output_bytes, proc.stderr.fileno(): max_output_bytes,
                        report_pipe.fileno(): 1 << 20}
                out, err, report, reason = _collect(proc, caps, start + timeout_s)
            finally:
                _kill_everything(proc)
    lines = report.decode(errors="replace").splitlines()
    features = next((json.loads(line[len("ready "):]) for line in lines if line.startswith("ready ")), None)
    if features is None and reason is None:  # a broken machine, not a bad program: say so loudly
        raise RuntimeError(f"sandbox setup failed (exit {proc.returncode}): {err[-2000:].decode(errors='replace')}")
    if features is not None and not features["python"]:
        raise RuntimeError(f"the sandbox uid cannot read {sys.base_prefix}: use a world-readable Python, "
                           "or allow mount namespaces (CAP_SYS_ADMIN) so the sandbox can bind it in")
    returncode = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    if reason is None and 128 < returncode < 128 + signal.NSIG:
        reason = f"signal {signal.Signals(returncode - 128).name}"
    result = SandboxResult(returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                           reason == "timeout", reason, time.monotonic() - start)
    return result, features or {}, lines


def _collect(proc, caps, deadline):
    """Read the pipes in `caps` ({fd: byte cap}) until all close; stop at the deadline or past a cap."""
    buffers = {fd: bytearray() for fd in caps}
    selector = selectors.DefaultSelector()
    for fd in caps:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    reason, exited_at = None, None
    while selector.get_map() and reason is None:
        now = time.monotonic()
        if now >= deadline:
            reason = "timeout"
            break
        # The jailer has exited but something (an orphan, without a pid namespace) holds the pipes.
        if exited_at is None and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            exited_at = now
        if exited_at is not None and now - exited_at > 0.2:
            break
        for key, _ in selector.select(timeout=min(0.05, deadline - now)):
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                selector.unregister(key.fd)
            buffers[key.fd] += chunk
            if len(buffers[key.fd]) > caps[key.fd]:
                reason = "output_limit"
    selector.close()
    return *(bytes(buffers[fd][:cap]) for fd, cap in caps.items()), reason


def _kill_everything(proc):
    """Stop the jailer (it kills and reaps init, so no orphan is left to the host's pid 1), SIGKILL its
    session, then, as root, every process of the sandbox's private uid."""
    os.kill(proc.pid, signal.SIGTERM)  # not proc.send_signal: that would reap it
    for _ in range(200):  # wait for its exit without reaping it, so its pid (= process group id) stays ours
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            break
        time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if os.geteuid() != 0:
        return  # without a private uid, the pid namespace and PDEATHSIG are the only sweep
    uid = UID_BASE + proc.pid
    for _ in range(10):
        if not _pids_of_uid(uid):
            return
        try:  # kill(-1) as the uid reaches all its processes in one atomic pass, even a fork bomb's
            subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env=_ENV, cwd="/",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:  # no kill(1) binary: one by one, and loop
            for pid in _pids_of_uid(uid):
                os.kill(pid, signal.SIGKILL)


def _pids_of_uid(uid):
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/status") as status:
                fields = dict(line.split(":", 1) for line in status)
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
                pids.append(int(name))  # zombies are dead already; reaping them is their parent's job
        except (OSError, ValueError):
            pass
    return pids
