"""The config's three descriptions agree: the parser's keys and defaults (agent_core/config.py),
the commented default file (default_config.toml, the same text as config.toml.example), and the
README's configuration table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from agent_core import config

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_AS_A_TABLE = {"executor.gpu", "paths.mounts"}  # their own keys are listed instead


def parser_keys() -> set[str]:
    return set(config.KNOWN_KEYS) - DOCUMENTED_AS_A_TABLE


def readme_rows() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| `")]


def documented(key: str, rows: list[str]) -> bool:
    """`section.key` in a row's first cell, or a row naming another key of the section and then the
    bare key (`server.connect_timeout_secs` / `read_timeout_secs`)."""
    section, _, leaf = key.rpartition(".")
    for row in rows:
        cell = row.split("|")[1]
        names = re.findall(r"`([^`]+)`", cell)
        if key in names or (leaf in names or f"gpu.{leaf}" in names) and any(
                n.startswith(section + ".") for n in names):
            return True
    return False


def test_every_key_the_parser_knows_is_in_the_readme_table_and_nothing_else():
    rows = readme_rows()
    missing = sorted(k for k in parser_keys() if not documented(k, rows))
    assert not missing, f"README configuration table lacks {missing}"
    first_names = {re.findall(r"`([^`]+)`", row.split("|")[1])[0] for row in rows}
    unknown = sorted(n for n in first_names if "." in n and not n.startswith("[[")
                     and n not in config.KNOWN_KEYS)
    assert not unknown, f"README documents keys the parser does not know: {unknown}"


def test_every_key_is_in_the_default_file_under_its_table():
    text = config.default_text()
    assert text == (ROOT / "config.toml.example").read_text(encoding="utf-8")
    section, seen = "", set()
    for line in text.splitlines():
        header = re.match(r"^#?\s*\[+([a-z_.]+)\]+", line)
        if header:
            section = header.group(1)
            continue
        m = re.match(r"^#?\s*([a-z_.]+)\s*=", line)
        if m and section:
            seen.add(f"{section}.{m.group(1)}")
    missing = sorted(parser_keys() - seen - {"paths.mounts"})
    assert not missing, f"default_config.toml lacks {missing}"


def test_the_default_file_means_the_parsers_defaults():
    path = ROOT / "config.toml"
    written = config.parse(config.default_text(), path)
    # the one value the file sets on purpose: the reference agent's example server
    empty = config.parse(f'[server]\nbase_url = "{written.server.base_url}"\n', path)
    for section in ("server", "agent", "executor", "limits", "paths", "logging", "metrics"):
        a, b = dataclasses.asdict(getattr(written, section)), dataclasses.asdict(getattr(empty, section))
        assert a == b, f"[{section}] in default_config.toml differs from the parser's defaults"
