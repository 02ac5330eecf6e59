"""The Chinese READMEs stay twins of the English ones: same commands, options, config keys, code and tables.

Only prose is translated, so everything an operator types or looks up must match exactly; a failure names each
missing item and the file that lacks it, so an edit to one side can be mirrored on the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("README.md", "README.zh-CN.md"),
         ("executor-example/README.md", "executor-example/README.zh-CN.md")]
LINK_LINES = 5  # the twin link sits right under the title

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n(.*?)^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
# an inline span may wrap onto the next line, never past a paragraph break
INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
COMMAND = re.compile(r"\bagent-core[ \t]+([a-z][a-z-]*)(?:[ \t]+(install|uninstall)\b)?")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SECTIONS = "server|agent|executor|limits|paths|logging|metrics"
# dotted keys; a trailing file extension (`agent.log`) makes it a file name, not a key
KEY = re.compile(rf"(?<![\w.-])(?:{SECTIONS})(?:\.[a-z_][a-z0-9_]*)+(?![\w-])")
FILE_SUFFIXES = {"log", "toml", "json", "md", "py", "sh", "bak", "service"}
TABLE = re.compile(rf"\[\[?(?:{SECTIONS})(?:\.[a-z_][a-z0-9_]*)*\]\]?")


@dataclass(frozen=True)
class Doc:
    name: str
    text: str

    @property
    def fenced(self) -> list[str]:
        return [m.group(2) for m in FENCE.finditer(self.text)]

    @property
    def spans(self) -> list[str]:
        prose = FENCE.sub("\n\n", self.text)
        return [m.group(2) for para in re.split(r"\n[ \t]*\n", prose) for m in INLINE.finditer(para)]

    @property
    def code(self) -> list[str]:
        """Every fenced block and inline code span."""
        return self.fenced + self.spans

    @property
    def headings(self) -> list[str]:
        return [line.split(" ", 1)[0] for line in FENCE.sub("", self.text).splitlines()
                if re.match(r"#{1,6} ", line)]

    @property
    def table_rows(self) -> int:
        return sum(1 for line in FENCE.sub("", self.text).splitlines() if line.startswith("|"))


def commands(doc: Doc) -> set[str]:
    return {" ".join(filter(None, ("agent-core",) + m.groups())) for code in doc.code for m in COMMAND.finditer(code)}


def options(doc: Doc) -> set[str]:
    return {m.group(0) for code in doc.code for m in OPTION.finditer(code)}


def config_keys(doc: Doc) -> set[str]:
    keys = {m.group(0) for code in doc.code for m in KEY.finditer(code)}
    tables = {m.group(0) for code in doc.code for m in TABLE.finditer(code)}
    return {k for k in keys if k.rsplit(".", 1)[1] not in FILE_SUFFIXES} | tables


def inline_code(doc: Doc) -> set[str]:
    """Inline code is never translated, so every span (file names, values, messages) must appear on both sides."""
    return {f"`{span}`" for span in doc.spans}


def set_differences(what: str, en: Doc, zh: Doc, extract) -> list[str]:
    a, b = extract(en), extract(zh)
    problems = []
    if a - b:
        problems.append(f"{what} missing in {zh.name}: {', '.join(sorted(a - b))}")
    if b - a:
        problems.append(f"{what} missing in {en.name}: {', '.join(sorted(b - a))}")
    return problems


def twin_problems(en: Doc, zh: Doc) -> list[str]:
    """Everything that keeps the two files from being twins, one readable line each."""
    problems = []
    for extract, what in ((commands, "commands"), (options, "options"), (config_keys, "config keys"),
                          (inline_code, "inline code spans")):
        problems += set_differences(what, en, zh, extract)
    for doc, twin in ((en, zh), (zh, en)):
        target = Path(twin.name).name
        if f"]({target})" not in "\n".join(doc.text.splitlines()[:LINK_LINES]):
            problems.append(f"{doc.name}: no link to {target} in its first {LINK_LINES} lines")
    a, b = en.fenced, zh.fenced
    if len(a) != len(b):
        problems.append(f"code blocks: {len(a)} in {en.name}, {len(b)} in {zh.name}")
    for n, (x, y) in enumerate(zip(a, b), 1):
        if x != y:
            first = next(line for line in x.splitlines() + [""] if line)
            problems.append(f"code block {n} (starting {first!r}) differs between {en.name} and {zh.name}")
    if en.table_rows != zh.table_rows:
        problems.append(f"table rows: {en.table_rows} in {en.name}, {zh.table_rows} in {zh.name}")
    if en.headings != zh.headings:
        problems.append(f"heading levels differ: {en.name} {' '.join(en.headings)} / "
                        f"{zh.name} {' '.join(zh.headings)}")
    return problems


def load(name: str) -> Doc:
    return Doc(name, (ROOT / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("en_name, zh_name", PAIRS)
def test_chinese_readme_is_a_twin_of_the_english_one(en_name, zh_name):
    problems = twin_problems(load(en_name), load(zh_name))
    assert not problems, "\n".join(problems)


def test_extraction_finds_spans_blocks_and_wrapped_spans():
    doc = Doc("x.md", "# t\n\nRun `agent-core run --burst`, set `executor.capacity` and\n"
                      "`docker network create --internal -o\n  x` or ``a `b` --weird``.\n\n"
                      "```toml\n[[paths.mounts]]\nhost = \"~/.pi\"  # --not-prose\n```\n"
                      "`agent.log` and `agent-core.service_id` are files and labels; --bare is prose.\n")
    assert commands(doc) == {"agent-core run"}
    assert options(doc) == {"--burst", "--internal", "--weird", "--not-prose"}
    assert config_keys(doc) == {"executor.capacity", "[[paths.mounts]]", "paths.mounts"}


def test_a_dropped_key_is_named_with_the_file_that_lacks_it():
    en = load("README.md")  # its own twin here, so a drifted translation cannot mask this check
    broken = Doc("README.zh-CN.md", en.text.replace("`paths.min_free_disk_mb`", "`x`").replace("--burst", "-b"))
    problems = twin_problems(en, broken)
    assert "config keys missing in README.zh-CN.md: paths.min_free_disk_mb" in problems
    assert "options missing in README.zh-CN.md: --burst" in problems
