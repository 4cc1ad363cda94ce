"""The glossary's three views agree: every entry of the {glossary} block appears, with the same Chinese name, in
the English → 中文 table and in the 中文 → English table, and nothing else does."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "book" / "glossary.md").read_text(encoding="utf-8")


def _entries():
    block = TEXT.split("```{glossary}", 1)[1].split("\n```", 1)[0]
    found = re.findall(r"^(\S[^\n]*)\n  \(([^)]+)\)", block, re.M)
    assert len(found) == len(re.findall(r"^\S", block, re.M)) - 1, "an entry without '(中文)' on its first line"
    return found


def _table(heading):
    section = TEXT.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", section, re.M)
    return [row for row in rows if row[0] not in ("English", "中文") and not set(row[0]) <= set("-")]


def test_every_entry_has_a_chinese_name_and_no_entry_is_repeated():
    names = [name.lower() for name, _ in _entries()]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_the_english_table_lists_exactly_the_entries():
    assert sorted(_table("## English → 中文")) == sorted(_entries())


def test_the_chinese_table_lists_exactly_the_entries():
    assert sorted((en, zh) for zh, en in _table("## 中文 → English")) == sorted(_entries())


def test_the_english_table_is_in_alphabetical_order():
    names = [name.lower() for name, _ in _table("## English → 中文")]
    assert names == sorted(names)
