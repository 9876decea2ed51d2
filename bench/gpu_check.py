"""The GPU runbook: aha's own engine and trainer measured on one CUDA GPU, phase by phase, on a box
that may have nothing but torch and transformers (no network, no vLLM, no TRL, no psutil, no rich).

    PYTHONPATH=. python bench/gpu_check.py --out OUT                  # the GPU run, ≤ 8 minutes
    PYTHONPATH=. python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_check   # the CPU rehearsal

Phases, cheapest first (bench/gpu_phases.py): device facts and versions; the bf16 matmul peak; aha's
engine tokens/s at 64 and 256 rows and the sampler/trainer log-prob gap at T 1 and at T 0.7 /
top-p 0.9 (0.5B model); RL steps of aha's trainer at 8 prompts × 8 samples × 512 new tokens, with
the update's MFU against the measured peak and peak memory against `aha plan`'s prediction (0.5B);
the same two for the 1.5B model; then vLLM and TRL (bench/gpu_optional.py), each skipped in one line
where it is not installed. Models are random-init Qwen2s of Qwen2.5-0.5B's and -1.5B's shapes.

Each phase runs in its own process (a CUDA error or an out-of-memory in one cannot take the others
down), under a timeout and the run's overall budget, and writes its results to OUT/parts/NAME.json
as they come; OUT/gpu_check.json gathers them after every phase. A failed or timed-out phase is
recorded with the tail of its log and the next one runs. Logs and model files stay in --scratch
(not under OUT: only small files come back from the device machine).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent                       # aha itself: importable from any working directory, installed or not
PHASES = (("device", 60), ("matmul", 60), ("engine_0.5b", 150), ("rl_0.5b", 180), ("engine_1.5b", 150),
          ("rl_1.5b", 180), ("vllm", 240), ("trl", 200))          # (name, timeout in seconds), cheapest first
MIN_PHASE_S = 15                                                   # no phase starts with less time than this left


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/aha_gpu_check", help="the result folder (small JSON files only)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches: the CPU rehearsal")
    parser.add_argument("--budget-s", type=float, default=480, help="the whole run's time, in seconds")
    parser.add_argument("--phase-timeout", type=float, help="one timeout for every phase instead of its own")
    parser.add_argument("--only", help="comma-separated phase names, in the order of PHASES")
    parser.add_argument("--scratch", default="/tmp/aha_gpu_check_scratch", help="logs and model files")
    parser.add_argument("--inline", action="store_true",
                        help="run the phases in this process, without timeouts: the fast CPU rehearsal of the tests")
    parser.add_argument("--phase", help=argparse.SUPPRESS)                      # a child process: run this one
    parser.add_argument("--peak-flops", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_child(args) -> int:
    """One phase, in this process: its function from bench/gpu_phases.py, results in OUT/parts."""
    sys.path[:0] = [str(HERE), str(ROOT)]
    import gpu_phases
    part = gpu_phases.Part(Path(args.out) / "parts" / f"{args.phase}.json")
    ctx = gpu_phases.Ctx(device=args.device, tiny=args.tiny, scratch=Path(args.scratch), part=part,
                         peak_flops=args.peak_flops)
    import torch
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)             # tiny matmuls: more threads only wait on each other on a busy CPU
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"{args.phase}: --device cuda, but torch {torch.__version__} sees no CUDA GPU")
    try:
        phase_function(gpu_phases, args.phase)(ctx)
    except gpu_phases.Skip as skip:
        part.put("status", "skipped")
        part.put("why", str(skip))
        return 0
    part.put("status", "ok")
    return 0


def phase_function(gpu_phases, name: str):
    if name in ("vllm", "trl"):
        import gpu_optional
        return getattr(gpu_optional, f"phase_{name}")
    kind, _, size = name.partition("_")
    return {
        "device": gpu_phases.phase_device,
        "matmul": gpu_phases.phase_matmul,
        "engine": gpu_phases.engine_phase(size) if size else None,
        "rl": gpu_phases.rl_phase(size) if size else None,
    }[kind]


def run_phase(name: str, timeout: float, args, peak_flops: float | None) -> dict:
    """One phase in a child process (or in this one with --inline); its part merged with how it ended."""
    out, scratch = Path(args.out), Path(args.scratch)
    (scratch / "logs").mkdir(parents=True, exist_ok=True)
    part_file, log_file = out / "parts" / f"{name}.json", scratch / "logs" / f"{name}.log"
    part_file.unlink(missing_ok=True)
    if args.inline:
        start = time.monotonic()
        try:
            returncode = run_child(argparse.Namespace(**{**vars(args), "phase": name, "peak_flops": peak_flops}))
        except (Exception, SystemExit):
            log_file.write_text(traceback.format_exc())
            returncode = 1
        return phase_result(part_file, log_file, returncode, start, timeout)
    command = (
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--phase",
            name,
            "--out",
            str(out),
            "--device",
            args.device,
            "--scratch",
            str(scratch),
        ]
        + (["--tiny"] if args.tiny else [])
        + (["--peak-flops", str(peak_flops)] if peak_flops else [])
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    start = time.monotonic()
    with open(log_file, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)         # the phase and whatever it started
            child.wait()
            returncode = None
    return phase_result(part_file, log_file, returncode, start, timeout)


def phase_result(part_file: Path, log_file: Path, returncode: int | None, start: float, timeout: float) -> dict:
    """The phase's part, with its status: ok / skipped (its own), timeout (returncode None), failed."""
    result = json.loads(part_file.read_text()) if part_file.is_file() else {}
    result["seconds"] = round(time.monotonic() - start, 1)
    if returncode is None:
        result["status"] = "timeout"
        result["why"] = f"stopped after its {timeout:.0f} s timeout"
    elif returncode != 0 or "status" not in result:
        result["status"] = "failed"
        result["why"] = f"exit code {returncode}"
    if result["status"] in ("failed", "timeout"):
        result["log_tail"] = log_file.read_text(errors="replace")[-2000:]
    return result


def one_line(name: str, result: dict) -> str:
    status = result["status"]
    if status == "ok":
        return f"gpu_check: {name} ok in {result['seconds']} s: {result.get('summary', '')}"
    last = result.get("log_tail", "").strip().splitlines()[-1:] or [""]
    return f"gpu_check: {name} {status}: {result['why']}" + (f" ({last[0][:200]})" if status != "skipped" else "")


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:
        return run_child(args)
    known = [name for name, _ in PHASES]
    chosen = args.only.split(",") if args.only else known
    unknown = [name for name in chosen if name not in known]
    if unknown:
        print(f"gpu_check: unknown phase {', '.join(unknown)}: choose from {', '.join(known)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:], "commit": git_commit(),
              "device": args.device, "tiny": args.tiny, "budget_s": args.budget_s, "phases": {}}
    start, peak_flops = time.monotonic(), None
    for name, own_timeout in PHASES:
        if name not in chosen:
            continue
        left = args.budget_s - (time.monotonic() - start)
        if left < MIN_PHASE_S:
            result = {"status": "skipped", "why": f"the run's {args.budget_s:.0f} s budget is spent"}
        else:
            result = run_phase(name, min(args.phase_timeout or own_timeout, left), args, peak_flops)
        if name == "matmul":                 # MFU's peak: bf16 on CUDA, fp32 on CPU (the dtypes the models use)
            peak_flops = result.get("bf16_flops" if args.device == "cuda" else "fp32_flops")
        report["phases"][name] = result
        report["seconds"] = round(time.monotonic() - start, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        print(one_line(name, result), flush=True)
    failed = [name for name, r in report["phases"].items() if r["status"] in ("failed", "timeout")]
    print(f"gpu_check: {len(report['phases'])} phases in {report['seconds']} s, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f"; results in {out / 'gpu_check.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
