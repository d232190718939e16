"""Shared pieces of `make bench`: paths, generated data and run configs, launching 2-rank jobs, sampling
their memory and CPU time, and reading the per-step timestamps every section turns into a ratio.

Everything the bench generates lives under build/bench/ (git-ignored); only results go to bench/results/.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import harness  # noqa: E402  (the tests' launching helpers: one harness for tests and bench)
from harness import read_jsonl as _read_jsonl  # noqa: E402

BENCH = ROOT / "bench"
CHILDREN = BENCH / "children"  # the scripts a figure script launches, each named after its figure script
WORK = ROOT / "build" / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
BIN = Path(sys.executable).parent
TOKENIZER = ROOT / "assets" / "tiny-tokenizer"
NPROC = 2


# ------------------------------------------------------------------------------------------------ env

def child_env(extra: dict | None = None, gpu: bool = False) -> dict:
    """Environment of a launched job. Figures 1-4 are CPU figures (gloo, one core a rank) wherever the
    bench runs, so their jobs never see a GPU; only the GPU section passes gpu=True."""
    env = harness.child_env(cpu=not gpu)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    # One tokenized-data cache for the whole bench, so every section warms it once and then reads it.
    env["DS_FINETUNE_CACHE"] = str(WORK / "ds-cache")
    env["HF_DATASETS_CACHE"] = str(WORK / "hf-datasets-cache")
    # Each rank gets its share of the cores, whoever launches it (ds-finetune sets the same itself), so
    # the bare loop, ds-finetune and HF Trainer all run with the same intra-op threads.
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // NPROC))
    # What DeepSpeed's own launcher sets (ds-finetune sets it itself under torchrun): without it DeepSpeed's
    # CPU accelerator runs `numactl` at every ZeRO-3 reduce-scatter, in a baseline's process as well.
    env["LOCAL_SIZE"] = str(NPROC)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    env.update(extra or {})
    return env


def torchrun(script: Path, args: list[str], nproc: int = NPROC) -> list[str]:
    """torchrun argv (≈ 4 s cheaper per start than the `deepspeed` launcher; same processes underneath)."""
    return harness.torchrun_argv(script, args, nproc)


def ours_argv(config: Path, overrides=(), resume: str | None = None, nproc: int = NPROC) -> list[str]:
    """ds-finetune's real entry point (launch/train.py, what the `deepspeed` launcher runs)."""
    args = ["--config", str(config)]
    if resume is not None:
        args += ["--resume"] + ([] if resume == "auto" else [resume])
    return torchrun(ROOT / "launch" / "train.py", args + list(overrides), nproc)


# --------------------------------------------------------------------------------------------- launch

@dataclass
class Job:
    """One launched job: its start time (the clock every 'time to first step' starts from), its log, and
    a sampler thread that records, every 0.1 s, the process tree's RSS (-> peak_rss) and its CPU seconds
    (-> samples, for cpu_at). CPU seconds are the noise-robust twin of wall time on this shared machine:
    another process's load delays our steps but barely changes the CPU work they take."""
    argv: list[str]
    log: Path
    env_extra: dict | None = None
    gpu: bool = False
    t_start: float = 0.0
    peak_rss: int = 0
    process_peaks: dict = field(default_factory=dict)  # pid -> its own high-water mark (VmHWM), launcher excluded
    samples: list = field(default_factory=list)  # (wall time, CPU seconds of the whole process tree)
    proc: subprocess.Popen | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Job":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "w")
        self.t_start = time.time()
        # A new session: SIGKILL of the group takes the launcher and every rank, never the bench.
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=child_env(self.env_extra, self.gpu), stdout=out,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self):
        import psutil
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.Error:
            return
        known, cpu, tree, tick = {}, {}, [root], 0  # a process that exited keeps its last CPU reading
        while not self._stop.is_set() and self.proc.poll() is None:
            if tick % 20 == 0:  # finding descendants scans all of /proc: every 2 s is enough (ranks start once)
                try:
                    tree = [known.setdefault(p.pid, p) for p in [root] + root.children(recursive=True)]
                except psutil.Error:
                    break
            tick += 1
            rss = 0
            for p in tree:  # the same Process objects each time: their CPU times are cumulative
                try:
                    if p is not root:
                        self.process_peaks[p.pid] = max(self.process_peaks.get(p.pid, 0), vm_hwm(p.pid))
                    with p.oneshot():
                        rss += p.memory_info().rss
                        t = p.cpu_times()
                        cpu[p.pid] = t.user + t.system  # ranks are counted as processes of the tree
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.samples.append((time.time(), sum(cpu.values())))
            self._stop.wait(0.1)

    def cpu_at(self, t: float) -> float:
        """CPU seconds the job's processes had used by wall time t (linear between samples)."""
        s = self.samples
        if not s:
            return float("nan")
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0), (t1, c1) in zip(s, s[1:]):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)
        return s[-1][1]

    def wait(self, timeout: float = 600, check: bool = True) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.log.name}: timed out after {timeout:.0f} s; log: {self.log}")
        finally:
            self._stop.set()
        if check and code != 0:
            raise RuntimeError(f"{self.log.name}: exit {code}; last lines of {self.log}:\n{tail(self.log)}")
        return code

    def kill(self) -> None:
        """SIGKILL the launcher and every rank, like a node crash (harness.kill_job)."""
        harness.kill_job(self.proc)
        self._stop.set()

    def running(self) -> bool:
        return self.proc.poll() is None


# ------------------------------------------------------------------- memory, as the kernel counts it

def proc_status(field: str, pid: int | str = "self") -> int:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, ...) in bytes: the kernel's exact accounting, unlike
    sampling. KeyError when the process has no such line (a zombie has none), OSError once it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs 5), so a later VmHWM is the peak of
    what came after; returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status("VmRSS")


def vm_hwm(pid: int) -> int:
    """A process's peak RSS so far; 0 once it is gone."""
    try:
        return proc_status("VmHWM", pid)
    except (OSError, KeyError):
        return 0


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_for(predicate, job: Job | None = None, timeout: float = 300, interval: float = 0.02) -> bool:
    return harness.wait_for(predicate, timeout, interval, alive=job.running if job is not None else None)


# ------------------------------------------------------------------------------------------ step times

def read_jsonl(path: Path) -> list[dict]:
    """Per-step lines only (a log may hold event lines too); a killed run may leave a torn last line."""
    return [r for r in _read_jsonl(path, strict=False) if "step" in r]


def step_intervals(times: list[float], skip: int) -> list[float]:
    """Seconds per optimizer step from end-of-step timestamps, dropping the first `skip` steps (warm-up:
    allocator growth, first all-reduces, lazily created optimizer state)."""
    times = times[skip:]
    return [b - a for a, b in zip(times, times[1:])]


INTERVALS = 5  # the fewest step intervals a run's step-time figure is taken from


def timed_steps(warmup: int, intervals: int = INTERVALS) -> int:
    """Steps a run needs for `intervals` step intervals after its `warmup` steps (see step_intervals)."""
    return warmup + intervals + 1


def cpu_per_step(job: Job, times: list[float], skip: int) -> float:
    """CPU seconds (all ranks and the launcher) per steady-state step, between the end of step `skip` and
    the end of the last step."""
    times = times[skip:]
    if len(times) < 2:
        return float("nan")
    return (job.cpu_at(times[-1]) - job.cpu_at(times[0])) / (len(times) - 1)


def run_child(name: str, argv: list[str], env_extra: dict | None = None, timeout: float = 1800) -> Job:
    """One side's run of a figure script, to its end; its output in build/bench/logs/NAME.log."""
    job = Job(argv, WORK / "logs" / f"{name}.log", env_extra).start()
    job.wait(timeout)
    return job


def steps_per_s(intervals: list[float]) -> float:
    return 1.0 / statistics.median(intervals) if intervals else float("nan")


def interleaved(sides: dict, reps: int, describe=None) -> dict:
    """Each of two sides' `reps` runs (`sides[name](rep)`), alternating which goes first (a, b, b, a, ...) so a
    burst of load elsewhere hits both alike; `describe(name, rep, result)` after each. {name: [results]}."""
    runs = {name: [] for name in sides}
    first, second = sides
    for rep in range(reps):
        for name in ((first, second) if rep % 2 == 0 else (second, first)):
            runs[name].append(sides[name](rep))
            if describe is not None:
                describe(name, rep, runs[name][-1])
    return runs


def median(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def figure(fid: str, text: str, ours: list[float], baseline: list[float], unit: str, target=None,
           note: str = "") -> dict:
    """One figure from repetitions taken side by side (ours[i] beside baseline[i]): the medians of each side,
    the ratio as the median of the pairs' ratios, their spread (min, max) and whether the target is met.
    Load from other jobs on this machine comes in bursts that a neighbouring pair shares, so the median of
    the pairs' ratios is steadier than the ratio of the two medians."""
    ratios = [a / b for a, b in zip(ours, baseline) if a == a and b == b and b]
    ratio = median(ratios)
    met = None if target is None else ratio >= target[1] if target[0] == ">=" else ratio <= target[1]
    return {"id": fid, "figure": text, "ours": median(ours), "baseline": median(baseline), "unit": unit,
            "ratio": ratio, "spread": [min(ratios), max(ratios)] if ratios else None, "reps": len(ratios),
            "target": list(target) if target else None, "met": met, "note": note}


# ------------------------------------------------------------------------------------------- datasets

# Words the tiny tokenizer was trained on (tools/make_tiny_assets.py), so rows tokenize to ~1.6 tokens
# a word instead of byte soup.
WORDS = ("the a what is plus minus count from to reverse word sound does make color sky grass snow coal "
         "banana tomato orange plum repeat times spell number one two three four five six seven eight nine "
         "zero blue green white black yellow red purple says moo woof meow quack baa hoot roar oink cat dog "
         "sun tree bird fish moon star rain book lamp frog milk ship road cake Q: A: answer question").split()


def write_jsonl_dataset(path: Path, rows: int, seed: int, make_row) -> Path:
    """A generated JSONL dataset, `make_row(rng)` a row; skipped when it is already there (seeded: the same
    file). Written under a temp name and renamed, so a killed bench never leaves half a dataset."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(rows):
            f.write(json.dumps(make_row(rng)) + "\n")
    os.replace(tmp, path)
    return path


def write_text_dataset(path: Path, rows: int, words_per_row: int, seed: int) -> Path:
    """A JSONL `text` dataset of random word rows."""
    return write_jsonl_dataset(path, rows, seed, lambda rng: {"text": " ".join(rng.choices(WORDS, k=words_per_row))})


def long_rows() -> Path:
    """4,000 rows of ~290 tokens (truncated to max_length): every sequence is full, so steps cost the same."""
    return write_text_dataset(WORK / "data" / "long-rows-4k-w180.jsonl", rows=4000, words_per_row=180, seed=1)


# ---------------------------------------------------------------------------------------- run configs

def llama_params(m: dict) -> int:
    """Parameter count of an inline Llama config (untied embeddings, no biases)."""
    h, i, layers, v = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"], m["vocab_size"]
    kv = h // m["num_attention_heads"] * m["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * v * h + layers * per_layer + h


def llama(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, max_pos: int,
          dropout: float = 0.0) -> dict:
    """An inline random-init Llama config on the shipped tokenizer's vocabulary."""
    return {"model_type": "llama", "vocab_size": 512, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": max_pos, "attention_dropout": dropout, "tie_word_embeddings": False,
            "pad_token_id": 2, "bos_token_id": 0, "eos_token_id": 1}


def run_config(name: str, model_config: dict, data_path: Path, max_length: int, micro: int, accum: int,
               steps: int, output_dir: Path, **sections) -> Path:
    """Write a ds-finetune run config (YAML) under build/bench/configs and return its path.
    `sections` are extra keys per section, e.g. checkpoint={"every_steps": 5}, model={"dtype": "bf16"}."""
    cfg = {
        "model": {"config": model_config, "tokenizer": str(TOKENIZER), "dtype": "fp32"},
        "data": {"path": str(data_path), "format": "text", "max_length": max_length},
        "train": {"micro_batch_size": micro, "grad_accum": accum, "max_steps": steps, "lr": 3e-4,
                  "lr_schedule": "cosine", "warmup_steps": 2, "weight_decay": 0.01, "grad_clip": 1.0,
                  "zero_stage": 2, "seed": 1234},
        "checkpoint": {"every_steps": 0, "save_final": False, "keep_last": 0},
        "logging": {"progress_bar": False, "tensorboard": False, "sample_ids": False},
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = WORK / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def save_stall_run(name: str, config: Path, overrides: list[str], every: int, nproc: int = NPROC,
                   env_extra: dict | None = None) -> dict:
    """One ds-finetune run that saves every `every` steps: the median step without a save, the stall a save
    causes (the interval of the step after a save minus that median: metrics.jsonl's end-of-step time is
    taken before the save, so the save lands in the next interval), its noise floor (the same measure on
    the steps just before each save, which save nothing: a stall at or under it is not a measured stall),
    the whole run's steps, and the size of the first checkpoint."""
    out = WORK / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    Job(ours_argv(config, [*overrides, f"output_dir={out}"], nproc=nproc), WORK / "logs" / f"{name}.log",
        env_extra).start().wait(1200)
    times = [r["time"] for r in read_jsonl(out / "metrics.jsonl")]
    intervals = step_intervals(times, skip=0)  # intervals[i] runs from the end of step i + 1 to step i + 2
    with_save = [dt for i, dt in enumerate(intervals) if (i + 1) % every == 0 and i >= 2]
    without = [dt for i, dt in enumerate(intervals) if (i + 1) % every != 0 and i >= 2]
    before_save = [dt for i, dt in enumerate(intervals) if (i + 2) % every == 0 and i >= 2]
    manifest = json.loads((out / "checkpoints" / f"step_{every:08d}" / "manifest.json").read_text())
    shutil.rmtree(out)  # ~2.5 GB of checkpoints a run at the async section's size; only the figures are kept
    step_s = median(without)
    return {"step_s": step_s, "stall_s": median([dt - step_s for dt in with_save]),
            "floor_s": median([abs(dt - step_s) for dt in before_save]),
            "mean_interval_s": sum(intervals[2:]) / len(intervals[2:]),
            "ckpt_bytes": sum(f["size"] for f in manifest["files"].values())}


def warm_cache(config: Path) -> float:
    """Tokenize a run config's dataset into the bench's cache now (what ds-finetune's rank 0 does on a
    first start), so no timed start pays for it. Returns the seconds it took (0 when already cached)."""
    sys.path.insert(0, str(ROOT))
    from ds_finetune.config import load_config
    from ds_finetune.data import build_cache, cache_path, content_hash, load_tokenizer, resolve_data_files

    env = child_env()
    for key in ("DS_FINETUNE_CACHE", "HF_DATASETS_CACHE"):  # read by ds_finetune.data / datasets (lazily imported)
        os.environ[key] = env[key]
    cfg = load_config(str(config), [])
    tok = load_tokenizer(cfg.model.tokenizer)
    files = resolve_data_files(cfg.data.path)
    data_hash = content_hash(files, cfg.data.path, cfg.data.split)
    path = cache_path(cfg.data, data_hash, tok)
    if path.exists():
        return 0.0
    t0 = time.time()
    build_cache(cfg.data, tok, files, data_hash, path)
    return time.time() - t0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
