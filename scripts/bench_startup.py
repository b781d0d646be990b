#!/usr/bin/env python
"""Start-up time of a `sparse-ft train` run: seconds to the first log line, to the model loaded and
to the first optimizer step, for the demo model (configs/demo_smollm2_sst2.yaml), on a cold cache
(first run: GGUF conversion and the CPU precision probe happen) and a warm one (second run), plus
the time of `sparse-ft --help`.

    flock /tmp/heavy.lock python scripts/bench_startup.py           # table + docs/results/cpu_startup.json

Each run is the real command line in a fresh process (`python -m sparse_ft.cli train ...` with
`train.max_steps=1`), timed by when its log lines arrive; it is stopped after the first step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKERS = {"first_log_s": "sparse-ft train:", "model_loaded_s": "model loaded in",
           "first_step_s": "first optimizer step done"}


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def help_seconds(env: dict, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sparse_ft.cli", "--help"], env=env, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def one_run(config: str, out_dir: Path, env: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "sparse_ft.cli", "train", "--config", config, "train.max_steps=1",
           "train.eval_before=false", "task.num_test=8", "train.save_delta=false", f"train.output_dir={out_dir}",
           "train.overwrite_output_dir=true"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    times: dict = {}
    converted = False
    tail: list[str] = []
    try:
        for line in proc.stderr:
            now = time.perf_counter() - t0
            tail = (tail + [line])[-20:]
            converted |= "converting it once" in line
            for key, marker in MARKERS.items():
                if key not in times and marker in line:
                    times[key] = round(now, 2)
            if "first_step_s" in times or now > timeout:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the run and nothing else
        proc.wait()
    if "first_step_s" not in times:
        raise SystemExit(f"the run did not reach its first step:\n{''.join(tail)}")
    return {**times, "gguf_converted": converted}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/demo_smollm2_sst2.yaml")
    parser.add_argument("--runs", type=int, default=2, help="runs on the same cache; the first starts it empty")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one run may take to its first step")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "cpu_startup.json"))
    args = parser.parse_args(argv)

    subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--prepare"], cwd=ROOT, check=True,
                   capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="sparse-ft-startup-"))
    env = {**os.environ, "SPARSE_FT_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        result = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "config": args.config,
                  "help_s": round(help_seconds(env), 3), "runs": []}
        for i in range(args.runs):
            row = {"run": i + 1, "cache": "cold" if i == 0 else "warm",
                   **one_run(args.config, work / f"run{i}", env, args.timeout)}
            result["runs"].append(row)
            print(f"run {i + 1}: {row}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n`sparse-ft --help`: {result['help_s']:.2f} s   ({result['machine']})\n")
    print("| run | cache | first log line (s) | model loaded (s) | first step done (s) | GGUF converted |")
    print("|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['run']} | {r['cache']} | {r['first_log_s']:.1f} | {r['model_loaded_s']:.1f} | "
              f"{r['first_step_s']:.1f} | {'yes' if r['gguf_converted'] else 'no'} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
