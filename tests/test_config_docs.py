"""The config's descriptions agree with its one declaration (the `knob` fields of agent_core/config.py):
the commented default file (default_config.toml, the same text as config.toml.example) and the
README's configuration table name every declared key and show its declared default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

from agent_core import config
from agent_core.config import Kind, Knob

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_AS_A_TABLE = {"executor.gpu", "paths.mounts"}  # their own keys are listed instead
SET_ON_PURPOSE = {"server.base_url"}  # the default file names the reference agent's example server
UNSET = ("—", "unset")  # how the README writes "no default"


def section_keys() -> dict[str, Knob]:
    """The declared keys of the seven sections (not those inside executor.gpu, whose row is the table's)."""
    return {key: k for key, k in config.KNOBS.items() if not key.startswith("executor.gpu.")}


def means_default(k: Knob, value: Any) -> bool:
    """`value` (from the file, or a README cell read as TOML) says the declared default; None = not set."""
    if value is None or (value == "" and k.default is None):  # "" is unset for a key without a default
        return k.default in (None, ())
    if k.kind in (Kind.SIZE, Kind.BYTES):
        return k.default is not None and config.parse_size(value) == k.value
    if k.kind is Kind.PATH:
        return Path(value) == k.value
    if k.kind in (Kind.STRINGS, Kind.ARGV):
        return isinstance(value, list) and tuple(value) == k.default
    if k.kind is Kind.NUMBER:
        return type(value) in (int, float) and value == k.default
    return type(value) is type(k.default) and value == k.default


# --- the README table


def readme_rows() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| `")]


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split(" | ")]


def row_keys(row: str) -> list[str]:
    """The dotted keys a row's first cell names; a bare one is in the first one's section
    (`server.connect_timeout_secs` / `read_timeout_secs`, `executor.gpu.vendor`, `gpu.devices`)."""
    names = re.findall(r"`([^`]+)`", cells(row)[0])
    section = names[0].split(".")[0]
    return [n if n.split(".")[0] == section else f"{section}.{n}" for n in names]


def shown_defaults(row: str) -> list[Any]:
    """The default cell as values: one for the row, or one per key ("10 / 60", "info, text"). A trailing
    "(...)" explains; "—" and "unset" are None; the rest is read as TOML, or else as a bare word."""
    cell = re.sub(r"\s+\(.*\)$", "", cells(row)[1])
    parts = re.split(r"(?:, | / )(?=(?:[^`]*`[^`]*`)*[^`]*$)", cell)  # separators outside code spans
    return [_toml_or_word(re.sub(r"^`(.*)`$", r"\1", part)) for part in parts]


def _toml_or_word(text: str) -> Any:
    if text in UNSET:
        return None
    try:
        return tomlkit.parse(f"v = {text}").unwrap()["v"]
    except TOMLKitError:
        return text


def test_every_declared_key_is_in_the_readme_table_and_nothing_else():
    rows = readme_rows()
    named = {key for row in rows for key in row_keys(row)}
    missing = sorted(set(config.KNOBS) - named)
    assert not missing, f"README configuration table lacks {missing}"
    first_names = {re.findall(r"`([^`]+)`", cells(row)[0])[0] for row in rows}
    unknown = sorted(n for n in first_names if "." in n and not n.startswith("[[")
                     and n not in config.KNOWN_KEYS)
    assert not unknown, f"README documents keys the parser does not know: {unknown}"


def test_the_readme_table_shows_each_declared_default():
    declared, checked, wrong = section_keys(), set(), []
    for row in readme_rows():
        keys = [key for key in row_keys(row) if key in declared]
        if not keys:
            continue
        shown = shown_defaults(row)
        if len(shown) == 1:
            shown *= len(keys)  # one default for the row ("agent.service_id, agent.api_key | —")
        assert len(shown) == len(keys), f"{cells(row)[1]!r} is not one default per key of {keys}"
        for key, value in zip(keys, shown):
            checked.add(key)
            if not means_default(declared[key], value):
                wrong.append(f"{key}: README shows {value!r}, declared {declared[key].default!r}")
    assert not wrong, "\n".join(wrong)
    assert checked == set(declared)


def test_the_readme_table_rows_show_their_tables_defaults():
    rows = {row_keys(row)[0]: cells(row)[1] for row in readme_rows()}
    assert config.ExecutorConfig().gpu is None and rows["executor.gpu.vendor"].startswith("unset")
    assert config.PathsConfig().mounts == ()
    readonly = config.declared(config.Mount)["readonly"].default
    assert rows["[[paths.mounts]]"] == f"readonly = {str(readonly).lower()}"


def test_the_shown_defaults_are_read_as_values():
    assert shown_defaults("| `a.b` | `[\"A\", \"B\"]`, `[]` | x |") == [["A", "B"], []]
    assert shown_defaults("| `a.b` | 10 / 60 | x |") == [10, 60]
    assert shown_defaults("| `a.b` | \"\" (off) | x |") == [""]
    assert shown_defaults("| `a.b` | unset (`<dir>/run.sh` or `run.py`) | x |") == [None]
    assert shown_defaults("| `a.b` | 10m, ./data | x |") == ["10m", "./data"]
    size = Knob(Kind.BYTES, "10m")
    assert means_default(size, "10m") and means_default(size, 10 * 1024**2) and not means_default(size, "1m")
    assert not means_default(Knob(Kind.NUMBER, 5.0), "5") and not means_default(Knob(Kind.BOOL, False), 0)


# --- the default file


def default_file() -> dict[str, Any]:
    return tomlkit.parse(config.default_text()).unwrap()


def test_the_default_file_is_the_example():
    assert config.default_text() == (ROOT / "config.toml.example").read_text(encoding="utf-8")


def test_every_declared_key_is_in_the_default_file_under_its_table():
    section, seen = "", set()
    for line in config.default_text().splitlines():
        header = re.match(r"^#?\s*\[+([a-z_.]+)\]+", line)
        if header:
            section = header.group(1)
            continue
        m = re.match(r"^#?\s*([a-z_.]+)\s*=", line)
        if m and section:
            seen.add(f"{section}.{m.group(1)}")
    missing = sorted(set(config.KNOBS) - seen)
    assert not missing, f"default_config.toml lacks {missing}"


def test_the_default_files_values_are_the_declared_defaults():
    doc, wrong = default_file(), []
    for key, k in section_keys().items():
        section, leaf = key.split(".")
        value = doc.get(section, {}).get(leaf)
        if key in SET_ON_PURPOSE:
            assert k.default is None and value
        elif not means_default(k, value):
            wrong.append(f"{key}: the file says {value!r}, declared {k.default!r}")
    assert not wrong, "\n".join(wrong)
    # the tables are left out (commented), as their defaults are none
    assert "gpu" not in doc["executor"] and config.ExecutorConfig().gpu is None
    assert "mounts" not in doc["paths"] and config.PathsConfig().mounts == ()


def test_the_default_file_means_the_parsers_defaults():
    path = ROOT / "config.toml"
    written = config.parse(config.default_text(), path)
    empty = config.parse(f'[server]\nbase_url = "{written.server.base_url}"\n', path)
    assert written == empty
