"""`make demo` / `make resume-demo`: train the tiny config (into runs/tiny), run it again and SIGKILL it
mid-run, `--resume` it, and show that the resumed run computed exactly the steps of the uninterrupted one.

    python tools/resume_demo.py [--num-gpus 2] [--config configs/tiny.yaml] [--out runs/resume-demo]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("ds-finetune"))


def train_argv(config, out_dir: Path, num_gpus: int, *extra) -> list[str]:
    return [CLI, "train", config, "--num-gpus", str(num_gpus), *extra, "logging.progress_bar=false",
            "logging.sample_ids=true", f"output_dir={out_dir}"]


def read_metrics(out_dir: Path) -> dict[int, dict]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            break  # a line torn by the kill
        rows[row["step"]] = row
    return rows


def run_quiet(argv: list[str], log: Path) -> None:
    with open(log, "w") as f:
        code = subprocess.call(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"command failed ({code}); see {log}: {' '.join(argv)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-gpus", type=int, default=2)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "resume-demo")
    p.add_argument("--kill-after-step", type=int, default=15)
    args = p.parse_args()
    ref_dir, run_dir = ROOT / "runs" / "tiny", args.out / "interrupted"
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    t0 = time.time()
    print(f"1/3 train {args.config}, uninterrupted (the reference) -> {ref_dir}", flush=True)
    run_quiet(train_argv(args.config, ref_dir, args.num_gpus, "--overwrite"), args.out / "reference.log")

    print(f"2/3 the same run, SIGKILLed (whole process group) once step {args.kill_after_step} is logged "
          f"-> {run_dir}", flush=True)
    with open(args.out / "interrupted.log", "w") as log:
        proc = subprocess.Popen(train_argv(args.config, run_dir, args.num_gpus, "--overwrite"), cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None and max(read_metrics(run_dir), default=0) < args.kill_after_step:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(read_metrics(run_dir), default=0)
    print(f"    killed after step {killed_at}", flush=True)

    print("3/3 resume with --resume", flush=True)
    run_quiet(train_argv(args.config, run_dir, args.num_gpus, "--resume"), args.out / "resumed.log")
    resumed_line = next((l for l in (args.out / "resumed.log").read_text().splitlines() if "resumed from" in l), "")
    print("    " + resumed_line.replace("[ds-finetune] ", ""), flush=True)

    ref, got = read_metrics(ref_dir), read_metrics(run_dir)
    resume_step = int(resumed_line.split(" at step ")[1].split()[0]) if " at step " in resumed_line else 0
    print(f"\n{'step':>5}  {'reference loss':>20}  {'resumed loss':>20}  identical")
    same_all = sorted(ref) == sorted(got)
    for step in sorted(ref):
        if step <= resume_step:
            continue
        a, b = ref[step], got.get(step)
        same = b is not None and repr(a["loss"]) == repr(b["loss"]) and a["sample_ids"] == b["sample_ids"]
        same_all &= same
        print(f"{step:>5}  {a['loss']:>20.15f}  {b['loss'] if b else float('nan'):>20.15f}  {'yes' if same else 'NO'}")
    print(f"\nidentical: {'yes' if same_all else 'no'} (losses bitwise and sample_ids, steps {resume_step + 1}.."
          f"{max(ref)}; {time.time() - t0:.0f} s)")
    print(f"outputs: {ref_dir}/metrics.jsonl, {ref_dir}/checkpoints, {ref_dir}/tensorboard; logs in {args.out}")
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main())
