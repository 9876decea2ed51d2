"""Checkpoints that survive a crash, and `aha train --resume DIR` that continues bit for bit.

    aha train --steps 500 --out runs/long checkpoint_every=50     # killed at step 321 …
    aha train --resume runs/long                                   # … continues from step 300

A checkpoint is `OUT/checkpoints/step-N/` (N = steps done):
    model/        a plain transformers dir (LoRA merged), loadable on its own
    trainer.pt    optimizer state, RNG states (python, numpy, torch), the task cursor (problems
                  drawn so far), the NaN-streak counter, metrics and evals so far, the LoRA
                  adapter and the reference model when they exist
It is written into `step-N.tmp-PID`, every file fsync'd, then renamed into place in one atomic
step and the parent dir fsync'd: a crash mid-write leaves a `.tmp` dir that is ignored and
removed next time, never a broken `step-N`. The newest `keep_checkpoints` are kept. "Latest" is
the highest complete `step-N`; there is no pointer file to go stale.

Generation needs no saved generator: its seed is derived from (seed, step) (aha/core/train.py). What
the step's randomness depends on besides that — the weights, AdamW's moments, the problem stream
and torch's global RNG — is all in the checkpoint, so on CPU the resumed run equals the
uninterrupted one.

The run folder's records live here too: `prepare_out_dir` (a new run's folder), `open_records`
(metrics.jsonl and rollouts.jsonl, cut back to the checkpoint on resume) and `Cursor` (the
task's stream, counting the problems drawn).

The run folder is locked (`OUT/.lock`, flock) while a run writes into it; the kernel drops the
lock when the process dies, even by SIGKILL, so a crashed run never blocks its own resume.

`AHA_KILL_AT=after_step:N | during_checkpoint:N | after_checkpoint:N` makes the process SIGKILL
itself at that point: the crash-resume tests use it to die at exact places.
"""

import errno
import fcntl
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from transformers.utils.logging import disable_progress_bar

from aha.infra.card import write_card
from aha.infra.errors import AhaError

CHECKPOINTS = "checkpoints"


def maybe_kill(point: str, step: int) -> None:
    """Fault injection for tests: die here without any cleanup, as a power cut would."""
    if os.environ.get("AHA_KILL_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Files, then the dirs that name them, deepest first."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [root]:
        _fsync(path)


def complete_checkpoints(out: Path) -> list[Path]:
    """`step-N` dirs, oldest first (temp dirs of interrupted writes are not checkpoints)."""
    root = out / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(out: Path, steps_done: int, model, tokenizer, trainer_state: dict, keep: int, card=None) -> Path:
    """Write `out/checkpoints/step-{steps_done}` atomically; keep the newest `keep`. A write that
    fails (a full disk) removes its temp dir and leaves every earlier checkpoint as it was.
    `card`: the model card (aha/infra/card.py `CardInfo`) written into its model/."""
    root = out / CHECKPOINTS
    root.mkdir(exist_ok=True)
    for stale in root.glob("step-*.tmp-*"):           # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{steps_done}"
    temp = root / f"step-{steps_done}.tmp-{os.getpid()}"
    try:
        disable_progress_bar()                         # transformers' "Writing model shards" bar
        model.save_pretrained(temp / "model")
        tokenizer.save_pretrained(temp / "model")
        if card is not None:
            write_card(temp / "model", card)
        maybe_kill("during_checkpoint", steps_done)
        torch.save(trainer_state, temp / "trainer.pt")
        _fsync_tree(temp)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        last = complete_checkpoints(out)
        keeps = f"the last good checkpoint is {last[-1]}" if last else "no earlier checkpoint exists"
        what = "the disk is full" if exc.errno == errno.ENOSPC else f"{exc.strerror or exc}"
        raise AhaError(f"could not write checkpoint {final}: {what}; {keeps}; free space and continue with "
                       f"`aha train --resume {out}`") from None
    if final.exists():                                 # the same step saved before (a resumed run)
        shutil.rmtree(final)
    os.rename(temp, final)
    _fsync(root)
    for old in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path:
    found = complete_checkpoints(out)
    if not found:
        raise AhaError(f"--resume {out}: no checkpoint in {out / CHECKPOINTS} (the run stopped before its first "
                       f"one; checkpoint_every sets how often they are written): start the run again")
    return found[-1]


def load_trainer_state(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / "trainer.pt", weights_only=False)
    except Exception as exc:
        raise AhaError(f"checkpoint {checkpoint} cannot be read ({type(exc).__name__}: {exc}); "
                       f"delete it to resume from the one before") from None


class RunLock:
    """An exclusive flock on `OUT/.lock` for as long as a run writes into OUT."""

    def __init__(self, out: Path):
        self.path, self.fd = out / ".lock", None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AhaError(f"run folder {self.path.parent} is in use by process {holder} (lock {self.path}); "
                           f"wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_not_locked(out: Path) -> None:
    """Raise if a live run holds `out`'s lock (before anything replaces or writes into `out`)."""
    if (out / ".lock").exists():
        RunLock(out).acquire().release()


class StopSignals:
    """SIGTERM/SIGINT during training set a flag; the loop checkpoints at the end of the step and
    stops. A second signal acts at once (the default behaviour)."""

    def __init__(self):
        self.received, self._old = None, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:                         # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)



def prepare_out_dir(path: str, force: bool) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise AhaError(f"--out {out} is a file: choose a directory")
    if out.exists() and any(out.iterdir()):
        check_not_locked(out)                      # never replace the folder of a live run
        if not force:
            raise AhaError(f"--out {out} is not empty: choose another directory, pass --force to replace it, "
                           f"or --resume {out} to continue its run")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


class Cursor:
    """The task's training stream, counting the problems drawn: the checkpoint's data position."""

    def __init__(self, problems, skip: int = 0):
        self.problems, self.consumed = problems, 0
        for _ in range(skip):
            next(self)

    def __iter__(self):
        return self

    def __next__(self):
        self.consumed += 1
        return next(self.problems)


def open_records(out: Path, history: list[dict]):
    """metrics.jsonl and rollouts.jsonl for appending, cut back to the steps in `history` (a resumed
    run drops what the crashed one logged after its last checkpoint)."""
    steps = len(history)
    kept = []
    if (out / "rollouts.jsonl").exists():
        for line in (out / "rollouts.jsonl").read_text().splitlines():
            try:
                if json.loads(line)["step"] < steps:
                    kept.append(line)
            except (ValueError, KeyError):
                pass                                   # a line cut short by the crash
    for name, lines in [("metrics.jsonl", [json.dumps(r) for r in history]), ("rollouts.jsonl", kept)]:
        temp = out / f"{name}.tmp"
        temp.write_text("".join(line + "\n" for line in lines))
        os.replace(temp, out / name)
    return open(out / "metrics.jsonl", "a"), open(out / "rollouts.jsonl", "a")


def resume_config(run_dir: str, steps=None, changed: list[str] = ()):
    """The saved config of the run in `run_dir`, which `aha train --resume` continues: only `steps` may
    change (to extend the run); `changed` names what the command line would change besides it."""
    from aha.infra.config import load_config
    if changed:
        raise AhaError(f"--resume continues the run with its saved config; {', '.join(changed)} cannot change "
                       f"(only steps=N can, to extend the run): start a new run to change them")
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise AhaError(f"--resume {run_dir}: no config.yaml there; give the --out folder of an aha train run")
    cfg = load_config(str(saved), {"steps": steps} if steps is not None else {})
    cfg.out = run_dir
    return cfg
