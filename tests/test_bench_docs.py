"""docs/benchmarks.md is generated from one results file of one full `make bench` run; nothing in it is typed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402
import run as bench_run  # noqa: E402


def doc_results() -> tuple[str, dict]:
    name = report.doc_results_name()
    assert name, "docs/benchmarks.md names no results file"
    return name, json.loads((ROOT / "bench" / "results" / name).read_text())


def test_benchmarks_doc_is_its_template_rendered_from_the_results_file_it_names():
    name, results = doc_results()
    assert report.DOC.read_text() == report.render_doc(report.TEMPLATE.read_text(), results, name), (
        "docs/benchmarks.md differs from bench/benchmarks.md.in rendered with its results: edit the template, "
        "then `python bench/report.py --render`")


def test_the_results_behind_the_doc_are_one_full_run_of_every_section_on_one_commit():
    _, results = doc_results()
    assert results["mode"] == "full" and not results["errors"]
    assert set(results["sections"]) == set(bench_run.SECTIONS)
    assert len(results["commit"]) == 40 and results["uncommitted_changes"] is False
    for f in results["figures"]:
        assert f["commit"] == results["commit"] and f["section"] in bench_run.SECTIONS, f["id"]
        if isinstance(f["ratio"], float):  # a measured ratio comes with >= 3 repetitions and their spread
            assert f["reps"] >= 3 and f["spread"][0] <= f["spread"][1], f["id"]
    ids = [f["id"] for f in results["figures"]]
    assert len(ids) == len(set(ids))


def test_a_placeholder_naming_no_figure_is_an_error():
    results = {"figures": [{"id": "a", "ratio": 0.5, "spread": [0.4, 0.6], "unit": "s", "ours": 1.0, "baseline": 2.0,
                            "target": ["<=", 0.6], "met": True, "figure": "x", "section": "s"}],
               "date": "2026-12-06", "wall_s": 60, "mode": "full", "skipped": {"g": "no GPU"}, "commit": "0" * 40, "sections": {"s": {"wall_s": 6}},
               "machine": {"cpu": "cpu", "logical_cores": 2, "torch": "t", "deepspeed": "d"}}
    assert (report.render_doc("{{a}} {{a.spread}} {{a.met}} {{wall:s}} {{skipped:g}}", results, "r.json")
            == "0.500 0.400-0.600 met 0.1 no GPU")
    with pytest.raises(ValueError, match="names no figure"):
        report.render_doc("{{b}}", results, "r.json")


def test_no_merge_conflict_markers_in_the_tree():
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True).stdout.split()
    for name in files:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".yaml", ".in", ".cfg", ".toml", ".txt") and path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                assert not line.startswith(("<<<<<<< ", ">>>>>>> ")), f"{name}: unresolved merge conflict"
