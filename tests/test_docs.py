"""The repository stands on its own: no file it tracks points outside it (a user's clone has
no sibling folders), and the design page names the modules that exist."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared|shared/seeds|\bDESIGN\.md\b")


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yaml", ".sh", ".sbatch", ".toml", ".txt", ".cfg"} or path.name == "Makefile":
            yield path


def test_no_tracked_file_points_outside_the_repository():
    this = Path(__file__).resolve()
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _tracked_text_files() if p.resolve() != this
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)


def test_the_design_page_names_only_modules_that_exist():
    text = (ROOT / "docs" / "design.md").read_text()
    layout = text[text.index("## Layout"):text.index("## Cross-rank rules")]
    named = set(re.findall(r"\b([a-z_]+\.py)\b", layout))
    existing = {p.name for p in (ROOT / "eglp_dist").rglob("*.py")} | {p.name for p in (ROOT / "tools").glob("*.py")}
    assert named and not named - existing, sorted(named - existing)
    # and every module of the package's top level and sub-packages appears in it
    package = {p.name for p in (ROOT / "eglp_dist").rglob("*.py")
               if p.name not in {"__init__.py", "__main__.py"} and "__pycache__" not in p.parts}
    grouped = {n for n in package if n.startswith(("synth", "convert"))}  # named as synth*.py, convert*.py
    missing = package - named - grouped
    assert not missing, sorted(missing)


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def test_the_readme_layout_names_only_what_the_tree_has():
    block = _readme_block("Layout")
    files = set(re.findall(r"\b([a-z_]+\.(?:py|sh|yaml|sbatch|example|md))\b", block))
    folders = set(re.findall(r"\b([a-z_]+)/", block))
    tree = {p.name for p in ROOT.rglob("*") if ".venv" not in p.parts and "runs" not in p.parts}
    assert files and not {f for f in files if f not in tree and "*" not in f}, sorted(files - tree)
    assert folders and not folders - tree, sorted(folders - tree)


def test_the_readme_lists_every_subcommand_the_cli_has():
    from eglp_dist.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    listed = re.search(r"# subcommands: ([^\n]+)", _readme_block("Command line")).group(1).split()
    assert sorted(listed) == sorted(sub.choices), (listed, sorted(sub.choices))
