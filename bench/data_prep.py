"""`make bench` section "data": preparing a generated chat set the size of real SFT sets.

  * rows/s of `ds-finetune data prepare` (parallel, masks included) ÷ rows/s of the usual recipe,
    `datasets.load_dataset` + `map(batched=True, num_proc=<cores>)` rendering the chat template and
    tokenizing (no masks), on the same 100k-row file in this invocation, each from a cold cache;
  * peak RSS of the preparing process tree at 100k and at 1M rows (streaming: it should not grow);
  * one rank's RSS after opening the prepared data (memory-mapped) and planning epoch 0, at 10k and 1M rows.

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

from common import PY, ROOT, TOKENIZER, WORDS, WORK, Job, log, median, write_jsonl_dataset  # noqa: E402

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
    small_rows, big_rows = (10_000, 100_000) if quick else (100_000, 1_000_000)
    load_small_rows = 10_000
    sets = {n: write_chat_dataset(DATA / f"chat-{n}.jsonl", n) for n in {small_rows, big_rows, load_small_rows}}
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

    ratios, ours_rss, our_rates, base_rates = [], [], [], []
    for rep in range(1 if quick else 2):  # interleaved, so a burst of load elsewhere hits both alike
        b = baseline(f"rep{rep}")
        o, rss = ours(small_rows, f"small-rep{rep}")
        base_rates.append(b["rows"] / b["seconds"])
        our_rates.append(o["rows"] / o["seconds"])
        ratios.append(our_rates[-1] / base_rates[-1])
        ours_rss.append(rss)
        log(f"rep {rep}: ours {our_rates[-1]:,.0f} rows/s, datasets.map {base_rates[-1]:,.0f} rows/s")
    big, big_rss = ours(big_rows, "big")
    log(f"{big_rows:,} rows: {big['rows'] / big['seconds']:,.0f} rows/s, peak RSS {big_rss / 2**20:,.0f} MB")

    loads = {}
    for n in (load_small_rows, big_rows):
        tag = "big" if n == big_rows else "load-small"
        if n != big_rows:
            ours(n, tag)
        loads[n], _ = run_job(f"load-{n}", [PY, me, "load", str(config_for(sets[n], WORK / "data-cache" / tag))])
    small_rss = median(ours_rss)
    prep, base = median(our_rates), median(base_rates)
    ratio, rss_ratio = median(ratios), big_rss / small_rss
    load_ratio = loads[big_rows]["rss"] / loads[load_small_rows]["rss"]
    setup = f"generated chat set (1-3 turns, 20 % with a system message), {os.cpu_count()} cores"
    figures = [
        {"id": "data_prep_speed", "figure": "data preparation rows/s, ours (masks included) / datasets.map",
         "ours": prep, "baseline": base, "unit": "rows/s", "ratio": ratio, "target": [">=", 1.0],
         "met": ratio >= 1.0, "note": f"{setup}; {small_rows:,} rows, each side from a cold cache, "
                                      f"datasets.map(batched=True, num_proc={os.cpu_count()}) renders and tokenizes"},
        {"id": "data_prep_rss", "figure": f"data preparation peak RSS, {big_rows:,} / {small_rows:,} rows",
         "ours": big_rss / 2**20, "baseline": small_rss / 2**20, "unit": "MB", "ratio": rss_ratio,
         "target": ["<=", 1.2], "met": rss_ratio <= 1.2, "note": "the preparing process tree (CLI process + workers)"},
        {"id": "data_rank_rss", "figure": f"one rank's RSS after loading, {big_rows:,} / {load_small_rows:,} rows",
         "ours": loads[big_rows]["rss"] / 2**20, "baseline": loads[load_small_rows]["rss"] / 2**20, "unit": "MB",
         "ratio": load_ratio, "target": ["<=", 1.1], "met": load_ratio <= 1.1,
         "note": "torch imported, cache memory-mapped, epoch 0 planned"},
    ]
    return {"figures": figures, "ours_rows_per_s": [round(x) for x in our_rates],
            "datasets_map_rows_per_s": [round(x) for x in base_rates],
            "prep_peak_rss_mb": {f"{small_rows}": round(small_rss / 2**20), f"{big_rows}": round(big_rss / 2**20)},
            "rank_rss_mb": {f"{n}": round(v["rss"] / 2**20) for n, v in loads.items()},
            "big_rows_per_s": round(big["rows"] / big["seconds"]), "cores": os.cpu_count()}


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {"baseline": lambda: measure_baseline(Path(args[0]), Path(args[1])), "ours": lambda: measure_ours(Path(args[0])),
     "load": lambda: measure_rank_load(Path(args[0]))}[mode]()
