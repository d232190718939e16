"""`make bench` section "data": preparing a generated chat set the size of real SFT sets.

  * rows/s of `ds-finetune data prepare` (parallel, masks included) ÷ rows/s of the usual recipe,
    `datasets.load_dataset` + `map(batched=True, num_proc=<cores>)` rendering the chat template and
    tokenizing (no masks), on the same 20k-row file in this invocation, each from a cold cache;
  * peak RSS of the preparing process tree at 20k and at 100k rows (streaming: it should not grow);
  * one rank's RSS after opening the prepared data (memory-mapped) and planning epoch 0, at 20k and 100k rows.

Each measurement runs in its own process (`python bench/data_prep.py MODE ...`), sampled by common.Job.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PY, ROOT, TOKENIZER, WORDS, WORK, Job, figure, log, write_jsonl_dataset  # noqa: E402

DATA = WORK / "data"


def chat_row(rng) -> dict:
    messages = [{"role": "system", "content": " ".join(rng.choices(WORDS, k=12))}] if rng.random() < 0.2 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))})
        messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(30, 150)))})
    return {"messages": messages}


def write_chat_dataset(path: Path, rows: int, seed: int = 7) -> Path:
    """Conversations of 1-3 turns, a fifth with a system message, ~340 tokens each (seeded: the same file)."""
    return write_jsonl_dataset(path, rows, seed, chat_row)


def config_for(data: Path, cache: Path) -> Path:
    import yaml
    cfg = {"model": {"config": {"model_type": "llama"}, "tokenizer": str(TOKENIZER)},
           "data": {"path": str(data), "format": "chat", "max_length": 4096, "cache_dir": str(cache)},
           "train": {"max_steps": 1}, "output_dir": str(WORK / "data-runs")}
    path = WORK / "configs" / f"data-{data.stem}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_job(name: str, argv: list[str]) -> tuple[dict, int]:
    """(the JSON line the measuring process printed last, the peak RSS of its process tree)."""
    job = Job(argv, WORK / "logs" / f"data-{name}.log").start()
    job.wait(timeout=3600)
    lines = [ln for ln in job.log.read_text().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]), job.peak_rss


# ------------------------------------------------------------------------------------ measuring processes

def measure_baseline(data: Path, scratch: Path) -> None:
    import datasets
    from transformers import AutoTokenizer
    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))

    def render_and_tokenize(batch):
        texts = [tok.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
        return tok(texts, add_special_tokens=False)

    t0 = time.time()
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(scratch))
    out = ds.map(render_and_tokenize, batched=True, num_proc=os.cpu_count(), remove_columns=ds.column_names)
    print(json.dumps({"seconds": time.time() - t0, "rows": len(out)}), flush=True)


def measure_ours(config: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from ds_finetune.config import load_config
    from ds_finetune.data import ensure_prepared, load_tokenizer, read_meta
    cfg = load_config(config)
    tok = load_tokenizer(cfg.model.tokenizer)
    t0 = time.time()
    path, _, built = ensure_prepared(cfg.data, tok)
    assert built, "the bench prepares from a cold cache"
    print(json.dumps({"seconds": time.time() - t0, "rows": read_meta(path)["rows_read"]}), flush=True)


def measure_rank_load(config: Path) -> None:
    """What a rank holds after it opened the prepared data: torch and the model code imported as in a
    rank, the cache memory-mapped, epoch 0 planned."""
    import psutil
    import torch  # noqa: F401  (a rank has it)
    sys.path.insert(0, str(ROOT))
    from ds_finetune.config import load_config
    from ds_finetune.data import EpochOrder, load_tokenizer, prepare_data, unit_targets
    cfg = load_config(config)
    d = prepare_data(cfg.data, load_tokenizer(cfg.model.tokenizer))
    units = EpochOrder(d, 1234, False, cfg.data.max_length).units(0)
    unit_targets(d, units[:64])
    print(json.dumps({"rss": psutil.Process().memory_info().rss, "rows": d.num_rows}), flush=True)


# ------------------------------------------------------------------------------------------------ section

def run(quick: bool) -> dict:
    # 3 interleaved repetitions of each measurement at 20k and 100k rows fit the bench's time; a 1M-row set
    # (480 s to prepare here) was measured in an earlier round (see git history of bench/results/).
    small_rows, big_rows = (2_000, 10_000) if quick else (20_000, 100_000)
    reps = 1 if quick else 3
    sets = {n: write_chat_dataset(DATA / f"chat-{n}.jsonl", n) for n in (small_rows, big_rows)}
    log(f"data sets ready: {', '.join(f'{n:,} rows' for n in sorted(sets))}")
    me = str(Path(__file__).resolve())

    def ours(n: int, tag: str) -> tuple[dict, int]:
        cache = WORK / "data-cache" / tag
        shutil.rmtree(cache, ignore_errors=True)
        return run_job(f"ours-{tag}", [PY, me, "ours", str(config_for(sets[n], cache))])

    def baseline(tag: str) -> dict:
        scratch = WORK / "hf-map-cache" / tag
        shutil.rmtree(scratch, ignore_errors=True)
        result, _ = run_job(f"baseline-{tag}", [PY, me, "baseline", str(sets[small_rows]), str(scratch)])
        shutil.rmtree(scratch, ignore_errors=True)
        return result

    def load(n: int, tag: str) -> int:
        return run_job(f"load-{tag}", [PY, me, "load", str(config_for(sets[n], WORK / "data-cache" / tag))])[0]["rss"]

    r = {k: [] for k in ("ours_rate", "base_rate", "small_rss", "big_rss", "small_load", "big_load")}
    for rep in range(reps):  # interleaved, so a burst of load elsewhere hits both alike
        for side in (("base", "ours") if rep % 2 == 0 else ("ours", "base")):
            if side == "base":
                b = baseline(f"rep{rep}")
                r["base_rate"].append(b["rows"] / b["seconds"])
            else:
                o, rss = ours(small_rows, f"small-{rep}")
                r["ours_rate"].append(o["rows"] / o["seconds"])
                r["small_rss"].append(rss / 2**20)
        big, big_rss = ours(big_rows, f"big-{rep}")
        r["big_rss"].append(big_rss / 2**20)
        r["small_load"].append(load(small_rows, f"small-{rep}") / 2**20)
        r["big_load"].append(load(big_rows, f"big-{rep}") / 2**20)
        log(f"data rep {rep}: ours {r['ours_rate'][-1]:,.0f} rows/s, datasets.map {r['base_rate'][-1]:,.0f} rows/s; "
            f"prep peak RSS {r['small_rss'][-1]:,.0f} / {r['big_rss'][-1]:,.0f} MB; rank RSS "
            f"{r['small_load'][-1]:,.0f} / {r['big_load'][-1]:,.0f} MB")
    shutil.rmtree(WORK / "data-cache", ignore_errors=True)
    setup = f"generated chat set (1-3 turns, 20 % with a system message), {os.cpu_count()} cores, {reps} repetitions"
    figures = [
        figure("data_prep_speed", "data preparation rows/s, ours (masks included) / datasets.map", r["ours_rate"],
               r["base_rate"], "rows/s", (">=", 1.0),
               f"{setup}; {small_rows:,} rows, each side from a cold cache, "
               f"datasets.map(batched=True, num_proc={os.cpu_count()}) renders and tokenizes"),
        figure("data_prep_rss", f"data preparation peak RSS, {big_rows:,} / {small_rows:,} rows", r["big_rss"],
               r["small_rss"], "MB", ("<=", 1.2), f"{setup}; the preparing process tree (CLI process + workers)"),
        figure("data_rank_rss", f"one rank's RSS after loading, {big_rows:,} / {small_rows:,} rows", r["big_load"],
               r["small_load"], "MB", ("<=", 1.1), f"{setup}; torch imported, cache memory-mapped, epoch 0 planned"),
    ]
    return {"figures": figures, "raw": r, "big_rows_per_s": round(big["rows"] / big["seconds"]),
            "cores": os.cpu_count()}


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {"baseline": lambda: measure_baseline(Path(args[0]), Path(args[1])), "ours": lambda: measure_ours(Path(args[0])),
     "load": lambda: measure_rank_load(Path(args[0]))}[mode]()
