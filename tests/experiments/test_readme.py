"""The READMEs' result tables equal what experiments.readme generates from the committed results files."""
import pytest

from experiments import readme


@pytest.mark.parametrize("path", readme.readmes(), ids=lambda p: str(p.relative_to(readme.ROOT)))
def test_readme_agrees_with_the_committed_results(path):
    text, changed = readme.regenerate(path.read_text())
    assert not changed, f"{path.name} disagrees with: {changed} (run: python -m experiments.readme)"


def test_readme_tables_are_generated():
    assert readme.BLOCK.search((readme.ROOT / "README.md").read_text()), "README.md has no generated results block"


def test_blocks_pick_tables_with_their_captions(tmp_path, monkeypatch):
    monkeypatch.setattr(readme, "ROOT", tmp_path)
    (tmp_path / "r.md").write_text("# Title\n\n**first**\n\n| a |\n|---|\n| 1 |\n\nprose\n\nsecond:\n| b |\n|---|\n| 2 |\n")
    assert readme.render("r.md", None) == "**first**\n\n| a |\n|---|\n| 1 |\n\nsecond:\n\n| b |\n|---|\n| 2 |\n"
    assert readme.render("r.md", "2") == "second:\n\n| b |\n|---|\n| 2 |\n"
    stale = "x\n<!-- results: r.md tables=1 -->\nold\n<!-- /results -->\ny\n"
    text, changed = readme.regenerate(stale)
    assert changed == ["r.md tables=1"] and "| 1 |" in text and "old" not in text
    assert readme.regenerate(text) == (text, [])
    with pytest.raises(IndexError):
        readme.render("r.md", "3")
