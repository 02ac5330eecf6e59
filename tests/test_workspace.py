"""agent_core.workspace: names, layout, task.json, output scanning, safe opening, removal.

Pure filesystem tests over tmp_path; no Docker, no server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Iterator

import pytest

from agent_core.config import LimitsConfig
from agent_core.errors import DiskFull, UnsafePath, WorkspaceError
from agent_core.protocol import InputFile, Task
from agent_core.workspace import (
    MAX_NAME_BYTES,
    ScanResult,
    Skipped,
    Workspace,
    check_free_disk,
    check_task_id,
    free_disk_mb,
    open_input,
    open_output,
    remove_workspace,
    safe_name,
    scan_outputs,
)

# --- check_task_id ----------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "0", "abc", "A1_b.c-d", "a..b", "x" * 128,
                                   "3f2b8c1e-5d4a-4c7b-9e0f-123456789abc"])
def test_check_task_id_accepts_plain_ids(value: str) -> None:
    assert check_task_id(value) == value


@pytest.mark.parametrize("value", ["", ".", "..", "../x", "a/b", "a\\b", "a\x00", "\x00", "-a", "_a", ".a",
                                   "é", "a\u00e9", "日本", "a b", "abc\n", "x" * 129, "x" * 4096])
def test_check_task_id_rejects_unsafe_strings(value: str) -> None:
    with pytest.raises(UnsafePath) as info:
        check_task_id(value)
    message = str(info.value)
    assert "\x00" not in message and "\n" not in message
    assert len(message) < 200  # shows ~40 characters of the value, not 4 KiB


@pytest.mark.parametrize("value", [None, 123, b"abc", ["a"]])
def test_check_task_id_rejects_non_strings(value: object) -> None:
    with pytest.raises(UnsafePath, match="must be a string"):
        check_task_id(value)


# --- safe_name ----------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("report.pdf", "report.pdf"),
    ("../../etc/passwd", "passwd"),
    ("a\\b", "b"),
    ("C:\\Users\\me\\notes.txt", "notes.txt"),
    ("dir/", "dir"),
    (".bashrc", "bashrc"),
    ("..", "file"),
    (".", "file"),
    ("...", "file"),
    ("", "file"),
    ("/", "file"),
    ("a\x00b.txt", "ab.txt"),
    ("line\nbreak\r.txt", "linebreak.txt"),
    ("\x1b[31mred", "[31mred"),
    ("🎉 party.png", "_ party.png"),
    ("résumé.pdf", "résumé.pdf"),
    ("re\u0301sume\u0301.pdf", "résumé.pdf"),  # NFC
    ("日本語 (1).txt", "日本語 (1).txt"),
    ("a+b=c, [d]@e.txt", "a+b=c, [d]@e.txt"),
    ("$(rm -rf ~);x|y&z.sh", "_(rm -rf _)_x_y_z.sh"),
    ("evil\u2215slash\uff0fname", "evil_slash_name"),
    ("  . spaced .txt  ", "spaced .txt"),
    ("bad\udcffbyte", "bad_byte"),
])
def test_safe_name_table(raw: str, expected: str) -> None:
    assert safe_name(raw) == expected


def test_safe_name_caps_long_names_keeping_the_extension() -> None:
    name = safe_name("x" * 300 + ".txt")
    assert name.endswith(".txt") and len(name.encode()) == MAX_NAME_BYTES
    wide = safe_name("日" * 300 + ".tar")  # 3 bytes a character: the cut must not split one
    assert wide.endswith(".tar") and len(wide.encode()) <= MAX_NAME_BYTES
    wide.encode("utf-8")
    no_ext = safe_name("y" * 300)
    assert no_ext == "y" * MAX_NAME_BYTES
    huge_ext = safe_name("a." + "b" * 300)  # not an extension worth keeping
    assert len(huge_ext.encode()) == MAX_NAME_BYTES and huge_ext.startswith("a.b")


@pytest.mark.parametrize("raw", ["..", "../..", "a/../..", "\x00", "\\..\\", ". .", "...\x00..", "~", "x" * 5000,
                                 "\u202egnp.exe", "🎉" * 100, "/etc/", "a\x00/..\x00/.."])
def test_safe_name_always_gives_one_harmless_component(raw: str) -> None:
    name = safe_name(raw)
    assert name and name not in (".", "..")
    assert not name.startswith((".", " "))
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES


# --- Workspace ------------------------------------------------------------------


def make_task(task_id: str = "task-1", files: int = 2, session_id: str | None = None) -> Task:
    return Task(
        id=task_id, task_prompt="Summarise the inputs", output_prompt="Write output/summary.md",
        session_id=session_id,
        input_files=tuple(InputFile(id=f"f{i}", filename=f"../doc {i}.txt", mime_type="text/plain" if i else None,
                                    size_bytes=10 * i) for i in range(files)),
    )


def test_for_task_builds_the_layout_under_data_dir(tmp_path: Path) -> None:
    ws = Workspace.for_task(tmp_path / "data", "task-1")
    root = (tmp_path / "data" / "workspaces" / "task-1").resolve()
    assert ws.root == root and ws.task_id == "task-1"
    assert ws.input_dir == root / "input" and ws.output_dir == root / "output"
    meta = (tmp_path / "data" / "tasks" / "task-1").resolve()
    assert ws.meta == meta and ws.task_json == root / "task.json"
    assert ws.stdout_log == meta / "stdout.log" and ws.stderr_log == meta / "stderr.log"
    assert not ws.exists()


@pytest.mark.parametrize("task_id", ["..", "../x", "a/b", "", "x" * 4096, "a\x00"])
def test_for_task_rejects_unsafe_ids(tmp_path: Path, task_id: str) -> None:
    with pytest.raises(UnsafePath):
        Workspace.for_task(tmp_path, task_id)


@pytest.mark.parametrize("folder", ["workspaces", "tasks"])
def test_for_task_rejects_a_symlink_planted_at_the_task_path(tmp_path: Path, folder: str) -> None:
    (tmp_path / folder).mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / folder / "t1").symlink_to(tmp_path / "elsewhere")
    (tmp_path / folder / "t2").symlink_to("t3")
    for task_id in ("t1", "t2"):
        with pytest.raises(UnsafePath):
            Workspace.for_task(tmp_path, task_id)


def test_create_sets_modes_whatever_the_umask(tmp_path: Path) -> None:
    ws = Workspace.for_task(tmp_path / "data", "task-1")
    old = os.umask(0o077)
    try:
        ws.create()
        ws.create()  # idempotent
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(os.lstat(p).st_mode)

    assert ws.exists()
    assert mode(tmp_path / "data") == 0o700 and mode(tmp_path / "data" / "workspaces") == 0o700
    assert mode(ws.root) == 0o755 and mode(ws.input_dir) == 0o755
    assert mode(ws.output_dir) == 0o777 and mode(ws.meta) == 0o700
    assert list(ws.output_dir.iterdir()) == []


def test_an_input_opens_empty_0644_whatever_the_umask_and_never_through_a_link(tmp_path: Path) -> None:
    ws = Workspace.for_task(tmp_path / "data", "task-1")
    ws.create()
    _, path = ws.input_path(1, "in.txt")
    path.write_bytes(b"an earlier attempt's bytes")
    old = os.umask(0o077)
    try:
        with open_input(path) as f:
            f.write(b"new")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o644
    # a link at the name is refused, not written through
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    _, linked = ws.input_path(2, "in.txt")
    linked.symlink_to(target)
    with pytest.raises(WorkspaceError, match="cannot write input file 02-in.txt"):
        open_input(linked)
    assert target.read_bytes() == b"keep"


def test_create_refuses_a_symlink_in_place_of_output(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    ws = Workspace.for_task(tmp_path / "data", "task-1")
    ws.create()
    ws.output_dir.rmdir()
    ws.output_dir.symlink_to(target)
    with pytest.raises(UnsafePath):
        ws.create()
    assert stat.S_IMODE(target.stat().st_mode) == 0o700  # not chmod-ed through the link


def test_input_path_numbers_in_server_order(tmp_path: Path) -> None:
    ws = Workspace.for_task(tmp_path, "t")
    assert ws.input_path(1, "a.txt") == ("input/01-a.txt", ws.input_dir / "01-a.txt")
    assert ws.input_path(2, "../../etc/passwd") == ("input/02-passwd", ws.input_dir / "02-passwd")
    assert ws.input_path(12, ".bashrc")[0] == "input/12-bashrc"
    assert ws.input_path(99, "x")[0] == "input/99-x"
    assert ws.input_path(5, "x", count=150)[0] == "input/005-x"
    assert ws.input_path(150, "x", count=150)[0] == "input/150-x"
    assert ws.input_path(100, "x")[0] == "input/100-x"
    for bad in (0, -1, True):
        with pytest.raises(ValueError):
            ws.input_path(bad, "x")


@pytest.mark.parametrize("name", ["../../../etc/passwd", "..", "/abs/path", "a\\..\\..\\b", "\x00", "x" * 1000])
def test_input_path_stays_inside_input(tmp_path: Path, name: str) -> None:
    ws = Workspace.for_task(tmp_path, "t")
    rel, path = ws.input_path(3, name)
    assert path.parent == ws.input_dir
    assert rel == f"input/{path.name}" and rel.startswith("input/03-")
    assert len(path.name.encode()) < 255


def test_write_task_json_has_the_executor_contract_shape(tmp_path: Path) -> None:
    task = make_task(files=2)
    ws = Workspace.for_task(tmp_path, task.id)
    ws.create()
    local = [ws.input_path(i, f.filename)[0] for i, f in enumerate(task.input_files, start=1)]
    ws.write_task_json(task, local)

    assert json.loads(ws.task_json.read_text(encoding="utf-8")) == {
        "task_id": "task-1",
        "task_prompt": "Summarise the inputs",
        "prompt": "Summarise the inputs",
        "output_prompt": "Write output/summary.md",
        "session_id": None,
        "input_files": [
            {"id": "f0", "filename": "../doc 0.txt", "mime_type": None, "size_bytes": 0,
             "local_path": "input/01-doc 0.txt"},
            {"id": "f1", "filename": "../doc 1.txt", "mime_type": "text/plain", "size_bytes": 10,
             "local_path": "input/02-doc 1.txt"},
        ],
    }
    assert stat.S_IMODE(ws.task_json.stat().st_mode) == 0o644  # readable by the container's uid
    assert sorted(p.name for p in ws.root.iterdir()) == ["input", "output", "task.json"]


def test_write_task_json_copes_with_odd_strings_and_checks_its_arguments(tmp_path: Path) -> None:
    task = Task(id="t", task_prompt="naïve \ud800 prompt", session_id="s")
    ws = Workspace.for_task(tmp_path, "t")
    ws.create()
    ws.write_task_json(task, [])
    doc = json.loads(ws.task_json.read_text(encoding="utf-8"))
    assert doc["prompt"] == "naïve \ud800 prompt" and doc["session_id"] == "s" and doc["input_files"] == []
    with pytest.raises(ValueError):
        ws.write_task_json(make_task(files=1, task_id="t"), [])
    with pytest.raises(ValueError):
        ws.write_task_json(make_task(task_id="other"), ["input/01-a", "input/02-b"])


# --- scan_outputs -------------------------------------------------------------------


def new_workspace(tmp_path: Path) -> Workspace:
    ws = Workspace.for_task(tmp_path / "data", "task-1")
    ws.create()
    ws.write_task_json(make_task(files=0), [])
    return ws


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rels(result: ScanResult) -> list[str]:
    return [f.rel for f in result.files]


def reasons(result: ScanResult) -> dict[str, str]:
    return {s.rel: s.reason for s in result.skipped}


def test_scan_outputs_finds_regular_files_and_skips_everything_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = new_workspace(tmp_path)
    root, out = ws.root, ws.output_dir
    write(ws.input_dir / "01-in.txt")
    write(out / "result.txt", b"hello")
    write(out / "nested" / "deep" / "x.md", b"##")
    write(out / "task.json", b"{}")  # only the root's task.json is excluded
    write(root / "top.txt", b"top")
    write(root / ".hidden", b"h")
    write(out / ".secret")
    write(out / ".cache" / "dir" / "f")
    write(out / "empty.txt", b"")
    (out / "link_hostname").symlink_to("/etc/hostname")
    (out / "link_root").symlink_to("/")
    (out / "loop1").symlink_to("loop2")
    (out / "loop2").symlink_to("loop1")
    (out / "linkdir").symlink_to(out / "nested")
    (root / "linkout").symlink_to(tmp_path)
    os.mkfifo(out / "fifo")
    monkeypatch.chdir(out)  # AF_UNIX paths are short: bind relative to the output dir
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("sock")
    finally:
        sock.close()
    os.close(os.open(os.fsencode(out) + b"/bad\xffname.txt", os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkdir(os.fsencode(out) + b"/bad\xfedir")
    write(Path(os.fsdecode(os.fsencode(out) + b"/bad\xfedir/inner.txt")))
    write(out / "ctrl\nname.txt")
    write(out / "tab\tdir" / "inner.txt")
    write(out / "日本語.txt", "ok".encode())

    result = scan_outputs(root, LimitsConfig())

    assert rels(result) == ["output/empty.txt", "output/nested/deep/x.md", "output/result.txt",
                            "output/task.json", "output/日本語.txt", "top.txt"]
    assert [f.size for f in result.files] == [0, 2, 5, 2, 2, 3]
    for f in result.files:
        assert f.path == root / f.rel and f.path.is_absolute()
    skipped = reasons(result)
    assert skipped == {
        "linkout": "symbolic link (never followed)",
        "output/bad\\xfedir": "name is not valid UTF-8",
        "output/bad\\xffname.txt": "name is not valid UTF-8",
        "output/ctrl\\nname.txt": "name contains control characters",
        "output/fifo": "named pipe (FIFO)",
        "output/link_hostname": "symbolic link (never followed)",
        "output/link_root": "symbolic link (never followed)",
        "output/linkdir": "symbolic link (never followed)",
        "output/loop1": "symbolic link (never followed)",
        "output/loop2": "symbolic link (never followed)",
        "output/sock": "socket",
        "output/tab\\tdir": "name contains control characters",
    }
    summary = result.summary()
    json.dumps(summary).encode("utf-8")  # JSON-able and valid UTF-8
    assert summary["skipped_count"] == len(skipped)
    assert {"path": "output/fifo", "reason": "named pipe (FIFO)"} in summary["skipped"]
    assert scan_outputs(root, LimitsConfig()) == result  # deterministic


def test_scan_outputs_never_follows_a_symlinked_root(tmp_path: Path) -> None:
    ws = new_workspace(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(ws.root)
    with pytest.raises(UnsafePath):
        scan_outputs(link, LimitsConfig())
    with pytest.raises(WorkspaceError):
        scan_outputs(tmp_path / "missing", LimitsConfig())


def test_scan_outputs_applies_the_per_file_and_total_caps(tmp_path: Path) -> None:
    ws = new_workspace(tmp_path)
    for name, size in [("a", 40), ("b", 101), ("c", 40), ("d", 40), ("e", 10)]:
        write(ws.output_dir / name, b"x" * size)
    limits = LimitsConfig(max_output_file_bytes=100, max_output_bytes=95)

    result = scan_outputs(ws.root, limits)

    assert rels(result) == ["output/a", "output/c", "output/e"]
    assert result.total_bytes == 90
    skipped = reasons(result)
    assert set(skipped) == {"output/b", "output/d"}
    assert "per-file limit" in skipped["output/b"] and "total" in skipped["output/d"]


def test_scan_outputs_count_cap_keeps_the_first_files_in_sorted_order(tmp_path: Path) -> None:
    ws = new_workspace(tmp_path)
    for i in reversed(range(30)):
        write(ws.output_dir / f"f{i:02d}")
    result = scan_outputs(ws.root, LimitsConfig(max_output_files=10))
    assert rels(result) == [f"output/f{i:02d}" for i in range(10)]
    assert len(result.skipped) == 20
    assert all("limit of 10 output files" in s.reason for s in result.skipped)


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs directory when there is one: creating 100,000 files on a busy ext4 takes ~10 s."""
    if not (os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="agent-core-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_scan_outputs_stays_cheap_with_100k_tiny_files(fast_tmp: Path) -> None:
    ws = new_workspace(fast_tmp)
    many = os.fsencode(ws.output_dir / "many")
    os.mkdir(many)
    for i in range(100_000):
        os.mknod(b"%s/f%06d" % (many, i))  # an empty regular file, one syscall
    write(ws.output_dir / "z-after.txt")
    limits = LimitsConfig(max_output_files=1000)

    result = scan_outputs(ws.root, limits)

    assert rels(result) == [f"output/many/f{i:06d}" for i in range(1000)]
    # Only max_output_files + slack entries are examined; the rest of the directory is one entry.
    rest = [s for s in result.skipped if s.rel == "output/many"]
    assert len(rest) == 1 and rest[0].count > 80_000 and "not examined" in rest[0].reason
    assert len(result.skipped) < 20_000
    summary = result.summary()
    assert len(summary["skipped"]) == 100
    assert summary["skipped_count"] == 100_000 + 1 - 1000  # every file not uploaded is counted


def test_scan_outputs_stops_at_the_depth_limit(tmp_path: Path) -> None:
    ws = new_workspace(tmp_path)
    deep = ws.output_dir.joinpath(*["d"] * 70)
    write(deep / "f.txt")
    write(ws.output_dir / "d" / "shallow.txt")
    result = scan_outputs(ws.root, LimitsConfig())
    assert rels(result) == ["output/d/shallow.txt"]
    assert len(result.skipped) == 1 and "deeper than" in result.skipped[0].reason


def test_summary_is_capped_and_counts_everything() -> None:
    result = ScanResult([], [Skipped(f"output/{i:03d}", "socket") for i in range(250)]
                        + [Skipped("output/big", "not examined", count=5)])
    summary = result.summary()
    assert len(summary["skipped"]) == 100 and summary["skipped_count"] == 255
    assert summary["skipped"][0] == {"path": "output/000", "reason": "socket"}
    assert ScanResult().summary() == {"skipped": [], "skipped_count": 0}


# --- open_output ------------------------------------------------------------------------


def scanned(tmp_path: Path, rel: str, data: bytes = b"payload") -> tuple[Workspace, Path, int]:
    ws = new_workspace(tmp_path)
    write(ws.root / rel, data)
    (found,) = [f for f in scan_outputs(ws.root, LimitsConfig()).files if f.rel == rel]
    return ws, found.path, found.size


def test_open_output_reads_a_scanned_file(tmp_path: Path) -> None:
    _, path, size = scanned(tmp_path, "output/sub/r.bin")
    with open_output(path, size) as f:
        assert f.read() == b"payload"


def test_open_output_refuses_a_symlink_swapped_in_after_the_scan(tmp_path: Path) -> None:
    _, path, size = scanned(tmp_path, "output/r.txt")
    path.unlink()
    path.symlink_to("/etc/hostname")
    with pytest.raises(UnsafePath):
        open_output(path, size)


def test_open_output_refuses_a_symlinked_parent_directory(tmp_path: Path) -> None:
    ws, path, size = scanned(tmp_path, "output/sub/r.txt")
    elsewhere = tmp_path / "elsewhere"
    (ws.output_dir / "sub").rename(elsewhere)
    (ws.output_dir / "sub").symlink_to(elsewhere)
    with pytest.raises(UnsafePath):
        open_output(path, size)


@pytest.mark.timeout(10)
def test_open_output_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    _, path, size = scanned(tmp_path, "output/r.txt")
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(UnsafePath):
        open_output(path, size)


def test_open_output_notices_a_changed_or_vanished_file(tmp_path: Path) -> None:
    _, path, size = scanned(tmp_path, "output/r.txt")
    path.write_bytes(b"much longer than before")
    with pytest.raises(UnsafePath, match="changed since the scan"):
        open_output(path, size)
    path.unlink()
    with pytest.raises(UnsafePath, match="vanished"):
        open_output(path, size)
    with pytest.raises(UnsafePath):
        open_output(Path("relative/path"), 1)
    with pytest.raises(UnsafePath):
        open_output(path.parent / ".." / "output" / "r.txt", 1)


# --- remove_workspace ---------------------------------------------------------------------


def build_messy_tree(root: Path, outside: Path) -> None:
    """What a container may leave: read-only and unreadable dirs, links out of the tree."""
    write(root / "output" / "ro" / "file.txt")
    os.chmod(root / "output" / "ro", 0o500)
    write(root / "output" / "locked" / "inner" / "file.txt")
    os.chmod(root / "output" / "locked" / "inner", 0o000)
    os.chmod(root / "output" / "locked", 0o000)
    write(root / "ro-file.txt")
    os.chmod(root / "ro-file.txt", 0o400)
    (root / "output" / "escape").symlink_to(outside)
    (root / "output" / "escape-file").symlink_to(outside / "keep.txt")
    os.chmod(root, 0o500)


def test_remove_workspace_removes_read_only_trees_without_following_links(tmp_path: Path) -> None:
    ws = new_workspace(tmp_path)
    outside = tmp_path / "outside"
    write(outside / "keep.txt", b"keep")
    build_messy_tree(ws.root, outside)

    remove_workspace(ws.root)

    assert not os.path.lexists(ws.root)
    assert (outside / "keep.txt").read_bytes() == b"keep"
    remove_workspace(ws.root)  # already gone: no error


def test_remove_workspace_removes_only_a_link_in_place_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "keep.txt")
    link = tmp_path / "ws-link"
    link.symlink_to(outside)
    remove_workspace(link)
    assert not os.path.lexists(link) and (outside / "keep.txt").exists()


def run_as_nobody(fn: Callable[[], None]) -> None:
    """Run `fn` in a forked child with uid/gid 65534, so permissions apply even when we are root."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn()
            code = 0
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report


@pytest.mark.skipif(os.geteuid() != 0, reason="as non-root the test above already meets real permissions")
def test_remove_workspace_unlocks_read_only_dirs_as_an_unprivileged_user() -> None:
    base = Path(tempfile.mkdtemp(prefix="agent-core-test-"))  # /tmp: reachable by uid 65534
    try:
        os.chown(base, 65534, 65534)
        root = base / "ws"

        def child() -> None:
            (root / "output").mkdir(parents=True)
            write(base / "outside" / "keep.txt")
            build_messy_tree(root, base / "outside")
            with pytest.raises(PermissionError):  # permissions really apply in here
                (root / "output" / "ro" / "new.txt").write_bytes(b"")
            remove_workspace(root)
            assert not os.path.lexists(root)
            assert (base / "outside" / "keep.txt").exists()

        run_as_nobody(child)
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a file owned by another user")
def test_remove_workspace_says_clearly_when_it_cannot(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="agent-core-test-"))
    try:
        os.chmod(base, 0o777)
        root = base / "ws"
        (root / "theirs").mkdir(parents=True)
        write(root / "theirs" / "file.txt")
        os.chown(root, 65534, 65534)
        os.chmod(root / "theirs", 0o755)  # root-owned: uid 65534 cannot empty or unlock it

        def child() -> None:
            with pytest.raises(WorkspaceError, match="cannot remove workspace"):
                remove_workspace(root)

        run_as_nobody(child)
    finally:
        shutil.rmtree(base)


# --- disk space ------------------------------------------------------------------------------


def test_free_disk(tmp_path: Path) -> None:
    free = free_disk_mb(tmp_path)
    assert free > 0
    assert free_disk_mb(tmp_path / "not" / "yet" / "created") == pytest.approx(free, abs=64)
    assert check_free_disk(tmp_path, 0) >= 0
    with pytest.raises(DiskFull, match="min_free_disk_mb"):
        check_free_disk(tmp_path, 10**12)
