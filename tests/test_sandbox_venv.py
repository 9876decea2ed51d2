"""The sandbox from an interpreter and a project that live where the sandbox hides things.

The sandbox mounts a private tmpfs over /tmp (and /var/tmp, /dev/shm). A venv made in /tmp, as a
new user makes one, and a clone of the project in /tmp must still work: the hostile-program suite
runs here with a venv's python under /tmp and a copy of the project under /tmp.
"""

import os
import shutil
import site
import subprocess
import tempfile
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tmp_under_tmp():
    path = Path(tempfile.mkdtemp(prefix="aha_venv_test_", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_hostile_suite_passes_from_a_venv_and_a_project_under_tmp(tmp_under_tmp):
    env_dir = tmp_under_tmp / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # the new venv sees this interpreter's packages (pytest, psutil) through a .pth file, but its
    # own sys.prefix is under /tmp, which is what the sandbox must keep visible
    target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    Path(target, "outer.pth").write_text("\n".join(paths) + "\n")
    project = tmp_under_tmp / "project"
    shutil.copytree(REPO / "aha", project / "aha", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (project / "tests").mkdir()
    shutil.copy(REPO / "tests" / "test_sandbox.py", project / "tests" / "test_sandbox.py")
    check = subprocess.run([python, "-c", "import sys, aha.tasks.sandbox as s; print(sys.prefix); print(s.__file__)"],
                           cwd=project, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(project)})
    prefix, module = check.stdout.split()
    assert prefix.startswith("/tmp/") and module.startswith(str(project)), check.stdout + check.stderr
    result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sandbox.py"],
                            cwd=project, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(project)})
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and "error" not in result.stdout.splitlines()[-1], tail
