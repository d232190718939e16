"""The bench's outputs: the machine it ran on, the table on stdout, the JSON and the PNG chart."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
from pathlib import Path

from common import BENCH, RESULTS, ROOT


# ----------------------------------------------------------------------------------------------- code

def code_version(repo: Path) -> dict:
    """The commit the bench measured, and whether tracked files differed from it (a figure from uncommitted
    code does not describe any commit)."""
    import subprocess

    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": head.stdout.strip(), "uncommitted_changes": git("diff", "--quiet", "HEAD").returncode != 0}


# -------------------------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(work_dir: Path) -> dict:
    import deepspeed
    import psutil
    import torch
    import transformers
    info = {
        "cpu": cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__, "load_avg_at_start": os.getloadavg(),
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    try:
        import accelerate
        info["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    info["filesystem"] = filesystem_of(work_dir)
    return info


def filesystem_of(path: Path) -> dict:
    import psutil
    path = path.resolve()
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    usage = shutil.disk_usage(path)
    return {"path": str(path), "device": best.device if best else "?", "fstype": best.fstype if best else "?",
            "free_gib": round(usage.free / 2**30, 1)}


def machine_slug(info: dict) -> str:
    """A short file-name-safe machine name: the CPU (or first GPU) model and the core count."""
    name = info["gpu"][0] if info["gpu"] else info["cpu"]
    name = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*|\d+-Core", "", name)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "machine"
    return f"{slug}-{info['logical_cores']}cpu" + (f"-{len(info['gpu'])}gpu" if info["gpu"] else "")


# ---------------------------------------------------------------------------------------------- table

def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value != value:
        return "nan"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) >= 1 else f"{value:.3f}"
    return f"{text} {unit}".strip()


def fmt_target(target) -> str:
    if not target:
        return "-"
    op, value = target
    return f"{op} {value}" if isinstance(value, (int, float)) else str(value)


def fmt_met(met) -> str:
    return "-" if met is None else "yes" if met else "NO"


def fmt_ratio(f: dict) -> str:
    return "-" if f["ratio"] is None else f"{f['ratio']:.3f}"


def fmt_spread(f: dict) -> str:
    spread = f.get("spread")
    return f"{spread[0]:.3f}-{spread[1]:.3f}" if spread else "-"


def rows_of(figures: list[dict]) -> list[tuple]:
    return [(f["figure"], fmt(f["ours"], f["unit"]), fmt(f["baseline"], f["unit"]), fmt_ratio(f), fmt_spread(f),
             str(f.get("reps", "-")), fmt_target(f["target"]), fmt_met(f["met"])) for f in figures]


HEAD = ("figure", "ours", "baseline", "ratio", "spread", "reps", "target", "met")


def table(figures: list[dict], errors: dict[str, str], skipped: dict[str, str]) -> str:
    rows = rows_of(figures)
    widths = [max(len(r[i]) for r in [HEAD, *rows]) for i in range(len(HEAD))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(HEAD), line(tuple("-" * w for w in widths)), *map(line, rows)]
    for name, reason in skipped.items():
        out.append(f"{name}: {reason}")
    for name, err in errors.items():
        out.append(f"{name}: FAILED - {err}")
    notes = [f"  {f['figure']}: {f['note']}" for f in figures if f.get("note")]
    return "\n".join(out + ["", "notes:"] + notes)


# ----------------------------------------------------------------------------------- docs/benchmarks.md

TEMPLATE, DOC = BENCH / "benchmarks.md.in", ROOT / "docs" / "benchmarks.md"
PLACEHOLDER = re.compile(r"\{\{([^{}]+)\}\}")


def markdown_table(figures: list[dict]) -> str:
    """A results table of docs/benchmarks.md, from the results JSON only (never typed by hand)."""
    rows = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for cells in rows_of(figures):
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def render_doc(template: str, results: dict, results_name: str) -> str:
    """docs/benchmarks.md from its template and one results file (or `quoted_results`' combination, with
    `results_name` its first file): every `{{...}}` is a value of those results (`{{table:SECTION}}`,
    `{{ID}}` the figure's ratio, `{{ID.ours}}`, `{{ID.baseline}}`, `{{ID.spread}}`, `{{ID.met}}`,
    `{{wall:SECTION}}` in minutes, `{{skipped:SECTION}}` why it did not run, `{{bench.FIELD}}`, where
    `bench.later` names the sections run again after the full run); an unknown one is an error, so the doc
    cannot quote a figure the results do not hold."""
    figures = {f["id"]: f for f in results["figures"]}
    bench = {"results": results_name, "commit": (results.get("commit") or "?")[:7], "date": results["date"][:10],
             "wall": f"{results['wall_s'] / 60:.0f}", "mode": results["mode"],
             "machine": f"{results['machine']['cpu']}, {results['machine']['logical_cores']} cores",
             "torch": results["machine"]["torch"], "deepspeed": results["machine"]["deepspeed"],
             "later": later_text(results.get("later", [])), "files": " ".join(results.get("files", [results_name]))}

    def value(match) -> str:
        key = match.group(1).strip()
        kind, _, name = key.partition(":")
        if kind == "table":
            return markdown_table([f for f in results["figures"] if f.get("section") == name])
        if kind == "wall":
            return f"{results['sections'][name]['wall_s'] / 60:.1f}"
        if kind == "skipped":
            return results["skipped"].get(name, "Ran")
        fid, _, field = key.partition(".")
        if fid == "bench":
            return bench[field]
        if fid not in figures:
            raise ValueError(f"{TEMPLATE.name}: {{{{{key}}}}} names no figure of {results_name}")
        f = figures[fid]
        if field in ("", "ratio"):
            return fmt_ratio(f)
        if field == "spread":
            return fmt_spread(f)
        if field == "met":
            return "met" if f["met"] else "**missed**" if f["met"] is not None else "no target"
        if field == "target":
            return fmt_target(f["target"])
        if field in ("ours", "baseline"):
            return fmt(f[field], f["unit"])
        raise ValueError(f"{TEMPLATE.name}: {{{{{key}}}}}: unknown field {field!r}")

    return PLACEHOLDER.sub(value, template)


def later_text(later: list[dict]) -> str:
    """The sentence naming the runs of some sections made after the full run (empty where none was)."""
    if not later:
        return ""
    runs = [f"{', '.join(run['sections'])} from [`bench/results/{run['name']}`](../bench/results/{run['name']}) "
            f"(commit `{run['commit'][:7]}`, {run['date'][:10]})"
            + "".join(f" in place of {name} of `{where}`, which failed ({error})"
                      for name, (where, error) in run.get("replaced_errors", {}).items()) for run in later]
    return (" Some sections were run again after it, alone, on newer code, and their figures replace that run's: "
            + "; ".join(runs) + ".")


def quoted_results(names: list[str], results_dir: Path = RESULTS) -> dict:
    """The results docs/benchmarks.md quotes: the first file, a full run of every section, with the sections
    of each later file (a run of some sections on newer code) in place of its own; a section that failed in
    an earlier file is quoted from the later run of it, and the doc says so (`errors`: those left)."""
    runs = [json.loads((results_dir / name).read_text()) for name in names]
    out = {**runs[0], "later": [], "files": list(names)}
    failed = {k: (names[0], e) for k, e in runs[0].get("errors", {}).items()}  # section -> (file, error)
    for name, run in zip(names[1:], runs[1:]):
        again = set(run["sections"])
        out["figures"] = [f for f in out["figures"] if f["section"] not in again] + run["figures"]
        out["sections"] = {**out["sections"], **run["sections"]}
        out["skipped"] = {**{k: v for k, v in out["skipped"].items() if k not in again}, **run["skipped"]}
        replaced = {k: failed.pop(k) for k in sorted(again & set(failed))}
        failed.update({k: (name, e) for k, e in run.get("errors", {}).items()})
        out["later"].append({"name": name, "commit": run["commit"], "date": run["date"], "sections": list(run["sections"]),
                             "replaced_errors": replaced})
    out["errors"] = {k: e for k, (_, e) in failed.items()}
    return out


def update_doc(names: list[str], doc: Path = DOC, template: Path = TEMPLATE) -> None:
    """Write docs/benchmarks.md from its template and the results files `names` (a full run, then any
    later runs of some sections)."""
    doc.write_text(render_doc(template.read_text(), quoted_results(names), names[0]))


def with_later_run(names: list[str], new: str, results_dir: Path = RESULTS) -> list[str]:
    """The files the doc quotes once the run of some sections `new` is added: a later file whose sections
    `new` all ran again no longer contributes and is dropped."""
    def sections(name: str) -> set:
        return set(json.loads((results_dir / name).read_text())["sections"])
    again = sections(new)
    kept = [n for n in names[1:] if n != new and sections(n) - again]
    return [names[0], *kept, new]


def doc_results_names(doc: Path = DOC) -> list[str]:
    """The results files docs/benchmarks.md was generated from (named in its header comment, the full run
    first)."""
    match = re.search(r"<!-- results: ([^>]*) -->", doc.read_text())
    return match.group(1).split() if match else []


# ---------------------------------------------------------------------------------------------- files

def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def write_chart(path: Path, figures: list[dict], title: str) -> None:
    """One horizontal bar per ratio; a dashed red tick at its target; green met, red missed, grey no target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [f for f in figures if isinstance(f.get("ratio"), (int, float)) and f["ratio"] == f["ratio"]]
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(10, 0.7 * len(bars) + 1.6))
    ys = range(len(bars))[::-1]
    colors = ["#9e9e9e" if f["met"] is None else "#2e7d32" if f["met"] else "#c62828" for f in bars]
    ax.barh(list(ys), [f["ratio"] for f in bars], color=colors, height=0.6)
    for y, f in zip(ys, bars):
        ax.text(f["ratio"], y, f" {f['ratio']:.3f}", va="center", fontsize=9)
        if f["target"] and isinstance(f["target"][1], (int, float)):
            ax.plot([f["target"][1]] * 2, [y - 0.4, y + 0.4], color="#d50000", linestyle="--", linewidth=1.5)
            ax.text(f["target"][1], y + 0.42, f"target {f['target'][0]} {f['target'][1]}", fontsize=7,
                    color="#d50000", ha="center")
    ax.axvline(1.0, color="black", linewidth=0.6)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f["figure"] for f in bars], fontsize=8)
    ax.set_xlim(0, max(1.3, max(f["ratio"] for f in bars) * 1.15))
    ax.set_ylim(-0.6, len(bars) - 0.2)  # room for the top bar's target label
    ax.set_title(title, fontsize=9, loc="left")
    # The yes/no results (kill/resume exactness) go under the axis, with the axis label.
    texts = [f"{f['figure']}: ours {f['ours']}, HF {f['baseline']}" for f in figures
             if f.get("ratio") is None and isinstance(f.get("ours"), str)]
    ax.set_xlabel("\n".join(["ratio (same invocation, medians)", *texts]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # `python bench/report.py --render`: the doc again, from the results it names
    import sys
    if sys.argv[1:] != ["--render"]:
        sys.exit("usage: python bench/report.py --render")
    update_doc(doc_results_names())
