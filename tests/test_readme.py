"""The README and docs/ stay true: every config key is documented in docs/config.md, the two commands are
the Makefile's, the README stays short, every relative link resolves, and nothing points outside the
repository."""
import re
from pathlib import Path

from ds_finetune.config import schema_lines

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 150


def test_config_reference_lists_every_key_with_its_description():
    reference = (ROOT / "docs" / "config.md").read_text()
    for line in schema_lines():
        key, rest = line.split(" (default ", 1)
        default, description = rest.split("): ", 1)
        row = f"| `{key}` | {default} | {description.replace('|', chr(92) + '|')} |"
        assert row in reference, f"docs/config.md is out of date for {key}: expected {row!r}"


def test_readme_names_the_commands_the_makefile_and_ci_run():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "## The two commands" in readme
    assert "make demo" in readme and "make test" in readme
    assert "\ndemo: install" in makefile
    assert re.search(r"\ntest:[^\n]*\n\t[^\n]*\$\(MAKE\)[^\n]* install && ", makefile)  # timed with the install
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}); move detail into docs/")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# [text](target) and ![alt](target), with an optional "title".
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _anchors(md: Path) -> set[str]:
    """GitHub's ids for the headings of a markdown file."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_relative_markdown_links_point_to_existing_files():
    assert (ROOT / "docs").is_dir()
    broken = []
    for md in _markdown_files():
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # links inside code blocks are not links
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # http(s):, mailto:, ...
            path, _, anchor = target.partition("#")
            dest = md.parent / path if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


# What would point outside the repository: the sibling folder holding the project's working notes, and the
# names of those notes. Built from pieces so that the needles themselves appear in no scanned file.
_OUTSIDE = ["shared" + "/", "SPEC" + " §", "SPEC" + ".md", "NOTES" + "-deepspeed"]
_SCANNED = ["README.md", "docs", "ds_finetune", "launch", "tools", "bench", "tests"]


def _scanned_files():
    this = Path(__file__).resolve()
    for name in _SCANNED:
        top = ROOT / name
        for path in [top] if top.is_file() else sorted(top.rglob("*")):
            if not path.is_file() or path.resolve() == this or "__pycache__" in path.parts:
                continue
            try:
                yield path, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # binary (a benchmark chart)


def test_nothing_refers_to_files_outside_the_repository():
    hits = []
    for path, text in _scanned_files():
        for number, line in enumerate(text.splitlines(), 1):
            if any(needle in line for needle in _OUTSIDE):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_example_configs_validate_with_dry_run(monkeypatch):
    from click.testing import CliRunner

    from ds_finetune.cli import main

    monkeypatch.chdir(ROOT)  # the configs name their files relative to the checkout
    out = {}
    for argv in (["configs/qwen2.5-0.5b-sft-zero2.yaml", "--num-gpus", "8"],
                 ["configs/qwen2.5-0.5b-lora-zero2.yaml", "--num-gpus", "8"],
                 ["configs/qwen2.5-0.5b-dpo-lora.yaml", "--num-gpus", "8"],
                 ["configs/llama3-8b-zero3-offload.yaml", "--hostfile", "configs/hostfile.example"],
                 ["configs/llama3-8b-32k-sp4-zero3.yaml", "--num-gpus", "8"]):
        result = CliRunner().invoke(main, ["train", *argv, "--dry-run"])
        assert result.exit_code == 0, (result.stderr, result.exception)
        assert "deepspeed" in result.stdout.splitlines()[0]
        out[argv[0]] = result.stdout
    assert "world_size=16 micro_batch_size=1 grad_accum=4 global_batch=64" in out["configs/llama3-8b-zero3-offload.yaml"]
    sp4 = out["configs/llama3-8b-32k-sp4-zero3.yaml"]
    assert "world_size=8 micro_batch_size=1 grad_accum=8 global_batch=16" in sp4
    assert "data_parallel=2 × sequence_parallel=4; up to 8192 tokens of a sequence per rank" in sp4


def test_the_readme_layout_table_rows_are_read_as_the_layout_they_are_listed_under():
    import json

    from ds_finetune.data.layouts import detect_layout
    from ds_finetune.data_config import DataConfig
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)`[^|]*\| `(\{.*\})` \|$", (ROOT / "README.md").read_text(), flags=re.M)
    assert len(rows) == 8 and {fmt for fmt, _, _ in rows} == {"chat", "prompt_completion", "preference", "text"}
    for fmt, layout, example in rows:
        cfg = DataConfig(path="x.jsonl", format=fmt)
        assert detect_layout(cfg, json.loads(example)) == layout, (fmt, layout, example)
