"""The figures the READMEs show or link are committed, are PNGs and stay small; experiments/README.md links every
study folder and at least one figure of each."""

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_FIGURE_BYTES = 200 * 1024
STUDIES = ("paper_comparison", "scale_out", "sensitivity", "capacity_factor", "convergence_calibration")
EXPERIMENTS_INDEX = REPO_ROOT / "experiments" / "README.md"
READMES = [REPO_ROOT / "README.md", EXPERIMENTS_INDEX] + [REPO_ROOT / "experiments" / s / "README.md" for s in STUDIES]
# ![alt](target) and [text](target), with an optional "title" after the target
IMAGE_LINK = re.compile(r'!\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
LINK = re.compile(r'(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')


def _targets(readme: Path, pattern: re.Pattern) -> list[Path]:
    """Local targets of `pattern`'s links in `readme`, as resolved paths (web addresses and anchors left out)."""
    links = pattern.findall(readme.read_text(encoding="utf-8"))
    return [(readme.parent / link.split("#")[0]).resolve() for link in links
            if "://" not in link and not link.startswith("#")]


def figures(readme: Path) -> list[Path]:
    """Every local image `readme` embeds, and every local .png it links."""
    linked_pngs = [path for path in _targets(readme, LINK) if path.suffix.lower() == ".png"]
    return _targets(readme, IMAGE_LINK) + linked_pngs


def _name(readme: Path) -> str:
    return str(readme.relative_to(REPO_ROOT))


def test_link_patterns() -> None:
    text = 'a ![fig](docs/a.png) b ![](b.png) c ![t](c.png "title") [not an image](d.png) [dir](e/)'
    assert IMAGE_LINK.findall(text) == ["docs/a.png", "b.png", "c.png"]
    assert LINK.findall(text) == ["d.png", "e/"]


def test_readmes_show_figures() -> None:
    assert figures(REPO_ROOT / "README.md"), "README.md embeds no figure"
    assert figures(EXPERIMENTS_INDEX), "experiments/README.md links no figure"


@pytest.mark.parametrize("readme", READMES, ids=_name)
def test_figures_exist_are_png_and_small(readme: Path) -> None:
    for figure in figures(readme):
        assert figure.is_relative_to(REPO_ROOT), f"{_name(readme)}: {figure} lies outside the repository"
        assert figure.is_file(), f"{_name(readme)}: {figure.relative_to(REPO_ROOT)} does not exist"
        data = figure.read_bytes()
        assert data[:8] == PNG_MAGIC, f"{_name(readme)}: {figure.relative_to(REPO_ROOT)} is not a PNG"
        assert len(data) < MAX_FIGURE_BYTES, (
            f"{_name(readme)}: {figure.relative_to(REPO_ROOT)} is {len(data) / 1024:.0f} KB (limit 200 KB)")


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_is_linked_from_the_experiments_index(study: str) -> None:
    folder = EXPERIMENTS_INDEX.parent / study
    assert (folder / "__main__.py").is_file() and (folder / "README.md").is_file(), study
    assert folder.resolve() in _targets(EXPERIMENTS_INDEX, LINK), f"experiments/README.md does not link {study}/"
    figure_names = [path.name for path in figures(EXPERIMENTS_INDEX)]
    assert any(name.startswith(f"{study}-") for name in figure_names), (
        f"experiments/README.md links no figure of {study} (docs/figures/{study}-*.png)")


def _commands(readme: Path, program: str) -> list[str]:
    """The `program ...` commands of `readme`'s bash blocks, continuation lines joined."""
    text = readme.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(block.replace("\\\n", " ") for block in blocks)
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.strip().startswith(program)]


def test_readme_plan_and_benchmark_examples_write_under_runs() -> None:
    plans = _commands(REPO_ROOT / "README.md", "symi plan")
    assert len(plans) >= 3
    for command in plans:
        out = re.search(r"--out\s+(\S+)", command)
        assert out and out.group(1).startswith("runs/"), f"README example writes outside runs/: {command}"
