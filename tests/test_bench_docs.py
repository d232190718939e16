"""docs/benchmarks.md is generated from the results files of one full `make bench` run and of any later runs of
some sections; nothing in it is typed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402
import run as bench_run  # noqa: E402


def doc_results() -> tuple[list[str], dict]:
    names = report.doc_results_names()
    assert names, "docs/benchmarks.md names no results file"
    return names, report.quoted_results(names)


def test_benchmarks_doc_is_its_template_rendered_from_the_results_files_it_names():
    names, results = doc_results()
    assert report.DOC.read_text() == report.render_doc(report.TEMPLATE.read_text(), results, names[0]), (
        "docs/benchmarks.md differs from bench/benchmarks.md.in rendered with its results: edit the template, "
        "then `python bench/report.py --render`")


def test_the_results_behind_the_doc_are_a_full_run_and_later_runs_of_some_sections_each_on_one_commit():
    names, quoted = doc_results()
    runs = [json.loads((ROOT / "bench" / "results" / name).read_text()) for name in names]
    assert "--only" not in runs[0]["command"]  # the first is a run of every section (of its day)
    assert set(quoted["sections"]) == set(bench_run.SECTIONS)
    assert not quoted["errors"]  # a section that failed in one run is quoted from a later run of it
    for run in runs:
        assert run["mode"] == "full"
        assert len(run["commit"]) == 40 and run["uncommitted_changes"] is False
        for f in run["figures"]:
            assert f["commit"] == run["commit"] and f["section"] in bench_run.SECTIONS, f["id"]
            if isinstance(f["ratio"], float):  # a measured ratio comes with >= 3 repetitions and their spread
                assert f["reps"] >= 3 and f["spread"][0] <= f["spread"][1], f["id"]
    ids = [f["id"] for f in quoted["figures"]]
    assert len(ids) == len(set(ids))


def test_a_later_run_of_some_sections_replaces_their_figures(tmp_path):
    def run(sections, commit):
        return {"figures": [{"id": f"{s}_x", "section": s, "commit": commit} for s in sections], "date": "2026-12-06",
                "sections": {s: {} for s in sections}, "skipped": {}, "commit": commit}
    for name, payload in {"full.json": run(["a", "b", "c"], "1" * 40), "b.json": run(["b"], "2" * 40),
                          "bc.json": run(["b", "c"], "3" * 40)}.items():
        report.write_json(tmp_path / name, payload)
    quoted = report.quoted_results(["full.json", "b.json", "bc.json"], tmp_path)
    assert {f["id"]: f["commit"][0] for f in quoted["figures"]} == {"a_x": "1", "b_x": "3", "c_x": "3"}
    assert "b, c from [`bench/results/bc.json`]" in report.later_text(quoted["later"])
    # a section that failed in the full run, run again later: quoted from there, the failure named
    report.write_json(tmp_path / "failed.json", {**run(["a", "c"], "4" * 40), "errors": {"b": "boom"}})
    quoted = report.quoted_results(["failed.json", "b.json"], tmp_path)
    assert quoted["errors"] == {} and {f["id"]: f["commit"][0] for f in quoted["figures"]}["b_x"] == "2"
    assert "in place of b of `failed.json`, which failed (boom)" in report.later_text(quoted["later"])
    assert report.quoted_results(["failed.json"], tmp_path)["errors"] == {"b": "boom"}
    # a later file whose sections all ran again is no longer quoted
    assert report.with_later_run(["full.json", "b.json"], "bc.json", tmp_path) == ["full.json", "bc.json"]
    assert report.with_later_run(["full.json", "bc.json"], "b.json", tmp_path) == ["full.json", "bc.json", "b.json"]


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
