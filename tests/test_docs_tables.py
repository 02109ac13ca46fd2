"""The generated tables in docs/*.md equal what their result files render (benchmarks/docs_tables.py).

Renders only committed files under benchmarks/results/; runs no benchmark. A failure here means a
table was edited by hand or its result file changed: run `python benchmarks/docs_tables.py --write`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_tables", REPO / "benchmarks" / "docs_tables.py")
docs_tables = importlib.util.module_from_spec(_spec)
sys.modules["docs_tables"] = docs_tables
_spec.loader.exec_module(docs_tables)

BLOCKS = [(path.name, match["name"]) for path in sorted(docs_tables.DOCS.glob("*.md"))
          for match in docs_tables.BLOCK.finditer(path.read_text())]


def test_docs_have_generated_tables():
    names = {name for _, name in BLOCKS}
    assert {"simulate-online", "simulate-online-curves", "ml100k-adapted", "ml100k-backbones"} <= names


@pytest.mark.parametrize("doc,name", BLOCKS, ids=[f"{d}:{n}" for d, n in BLOCKS])
def test_committed_table_matches_its_result_file(doc, name):
    text = (docs_tables.DOCS / doc).read_text()
    committed = [m[0] for m in docs_tables.BLOCK.finditer(text) if m["name"] == name]
    expected = docs_tables.block(name, docs_tables.render(name))
    assert all(c == expected for c in committed), (
        f"docs/{doc}: table {name!r} is stale; run `python benchmarks/docs_tables.py --write`")


def test_every_doc_block_is_well_formed():
    assert docs_tables.run(write=False) == []


def _copy_docs(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    shutil.copytree(docs_tables.DOCS, docs)
    return docs


def test_check_fails_on_a_tampered_table_and_write_fixes_it(tmp_path, capsys):
    docs = _copy_docs(tmp_path)
    doc = docs / "results.md"
    text = doc.read_text()
    block = next(m for m in docs_tables.BLOCK.finditer(text) if m["name"] == "simulate-online")
    row = next(line for line in block[0].splitlines() if line.startswith("| frozen |"))
    cells = row.split(" | ")
    cells[2] = "0.999"  # HR@10 of the frozen policy
    doc.write_text(text.replace(row, " | ".join(cells)))

    assert docs_tables.main(["--check", "--docs", str(docs)]) == 1
    assert "table 'simulate-online' differs" in capsys.readouterr().err
    assert docs_tables.main(["--write", "--docs", str(docs)]) == 0
    assert doc.read_text() == text
    assert docs_tables.main(["--check", "--docs", str(docs)]) == 0


def test_unknown_table_name_is_a_clear_error(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    text = "# x\n\n<!-- table: no-such-table -->\n| a |\n<!-- /table -->\n"
    (docs / "x.md").write_text(text)
    assert docs_tables.main(["--check", "--docs", str(docs)]) == 1
    err = capsys.readouterr().err
    assert "unknown table 'no-such-table'" in err and "simulate-online" in err  # lists the known ones
    assert docs_tables.main(["--write", "--docs", str(docs)]) == 1
    assert (docs / "x.md").read_text() == text  # left as it was
    with pytest.raises(docs_tables.TableError, match="unknown table 'no-such-table'"):
        docs_tables.render("no-such-table")


def test_missing_file_bad_render_function_and_unclosed_block_are_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(docs_tables.TABLES, "gone", ("benchmarks/results/gone.json", str))
    monkeypatch.setitem(docs_tables.TABLES, "typo", ("benchmarks/results/ddp_scaling.json",
                                                     "ddp_scaling:no_such_function"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("<!-- table: gone -->\n<!-- /table -->\n")
    (docs / "b.md").write_text("<!-- table: simulate-online -->\n| never closed |\n")
    (docs / "c.md").write_text("<!-- table: typo -->\n<!-- /table -->\n")
    problems = docs_tables.run(docs, write=False)
    assert any("a.md" in p and "benchmarks/results/gone.json is missing" in p for p in problems)
    assert any("b.md" in p and "without its <!-- /table -->" in p for p in problems)
    assert any("c.md" in p and "cannot import its render function 'ddp_scaling:no_such_function'" in p
               for p in problems)


def test_register_plugs_in_a_renderer(tmp_path, monkeypatch):
    monkeypatch.setattr(docs_tables, "TABLES", dict(docs_tables.TABLES))
    (tmp_path / "r.json").write_text('{"x": 0.5}')

    @docs_tables.register("toy", "r.json")
    def toy(result):
        return f"| x |\n|---|\n| {result['x']} |"

    text = "<!-- table: toy -->\nold\n<!-- /table -->\n"
    new, stale, errors = docs_tables.update(text, root=tmp_path)
    assert (stale, errors) == (["toy"], [])
    assert new == "<!-- table: toy -->\n\n| x |\n|---|\n| 0.5 |\n\n<!-- /table -->\n"
