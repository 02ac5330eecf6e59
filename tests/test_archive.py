"""agent_core.archive: the workspace as a tar stream in, and hostile tar streams out.

Pure: tar streams made here by hand (tarfile, and raw headers where tarfile would refuse to
write them), over tmp_path; no engine.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import tracemalloc
from pathlib import Path
from typing import Iterator

import pytest

from agent_core import archive
from agent_core.config import LimitsConfig
from agent_core.errors import WorkspaceError
from agent_core.protocol import InputFile, Task
from agent_core.workspace import Skipped, Workspace, scan_outputs

MiB = 1024 * 1024


def _task(task_id: str = "t1", inputs: int = 2) -> Task:
    return Task(id=task_id, task_prompt="p", output_prompt="o", session_id="s",
                input_files=tuple(InputFile(id=f"f{i}", filename=f"in{i}.txt", mime_type="text/plain",
                                            size_bytes=3) for i in range(inputs)))


def _staged(tmp_path: Path, task: Task | None = None) -> Workspace:
    """A workspace as the runner stages it: task.json, input/NN-name, an empty output/."""
    task = task or _task()
    ws = Workspace.for_task(tmp_path / "data", task.id)
    ws.create()
    rels = []
    for i, f in enumerate(task.input_files, start=1):
        rel, path = ws.input_path(i, f.filename)
        path.write_bytes(f"input {i}".encode())
        os.chmod(path, 0o644)
        rels.append(rel)
    ws.write_task_json(task, rels)
    return ws


def _empty_root(tmp_path: Path) -> Path:
    ws = _staged(tmp_path)
    archive.clear_outputs(ws.root)
    return ws.root


class Tar:
    """A tar stream made entry by entry, every name under "./" (as Docker names a "dir/." archive)
    unless given whole."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, whole: bool = False,
            linkname: str = "", mode: int = 0o644) -> Tar:
        info = tarfile.TarInfo(name if whole else f"./{name}")
        info.type, info.linkname, info.mode = kind, linkname, mode
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        self.tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return self

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()

    def body(self) -> bytes:
        """The entries so far, without the end marker: to go on by hand."""
        return self.buf.getvalue()[:self.tar.offset]

    def chunks(self, size: int = 1000) -> Iterator[bytes]:
        data = self.bytes()
        return (data[i:i + size] for i in range(0, len(data), size))  # chunks that cut headers in two


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under root but the staging: files with their bytes, directories as None (links fail)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if rel.split("/")[0] in ("task.json", "input"):
                continue
            mode = os.lstat(path).st_mode
            assert stat.S_ISDIR(mode) or stat.S_ISREG(mode), f"{rel} is neither file nor directory"
            out[rel] = None if stat.S_ISDIR(mode) else path.read_bytes()
    return out


# --- in --------------------------------------------------------------------------------


def test_the_workspace_goes_in_as_a_bind_mount_shows_it(tmp_path: Path) -> None:
    ws = _staged(tmp_path)
    data = b"".join(archive.workspace_tar(ws.root))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert list(members) == ["task.json", "input", "input/01-in0.txt", "input/02-in1.txt", "output"]
        for name, m in members.items():
            assert (m.uid, m.gid) == (0, 0)
            assert stat.S_IMODE(m.mode) == stat.S_IMODE(os.lstat(ws.root / name).st_mode)
        assert stat.S_IMODE(members["output"].mode) == 0o777 and members["output"].isdir()
        assert stat.S_IMODE(members["input/01-in0.txt"].mode) == 0o644
        assert tar.extractfile(members["input/02-in1.txt"]).read() == b"input 2"
        assert tar.extractfile(members["task.json"]).read() == ws.task_json.read_bytes()


def test_a_long_input_name_goes_in_whole(tmp_path: Path) -> None:
    task = Task(id="t1", task_prompt="p", output_prompt="o", session_id="s",
                input_files=(InputFile(id="f", filename="é" * 70 + ".txt", mime_type="", size_bytes=1),))
    ws = _staged(tmp_path, task)
    with tarfile.open(fileobj=io.BytesIO(b"".join(archive.workspace_tar(ws.root)))) as tar:
        assert any(m.name == "input/01-" + "é" * 70 + ".txt" for m in tar.getmembers())


def test_what_goes_in_is_never_read_through_a_link(tmp_path: Path) -> None:
    ws = _staged(tmp_path)
    (tmp_path / "secret").write_text("secret")
    target = next(ws.input_dir.iterdir())
    target.unlink()
    target.symlink_to(tmp_path / "secret")
    with pytest.raises(WorkspaceError):
        b"".join(archive.workspace_tar(ws.root))


def test_a_big_file_goes_in_in_chunks(tmp_path: Path) -> None:
    ws = _staged(tmp_path)
    with open(ws.input_dir / "03-big", "wb") as f:
        f.truncate(200 * MiB)  # sparse: quick to read
    tracemalloc.start()
    try:
        total = 0
        for chunk in archive.workspace_tar(ws.root):
            assert len(chunk) <= archive.CHUNK
            total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 200 * MiB and total % 512 == 0
    assert peak < 8 * MiB


# --- out: what is written ------------------------------------------------------------------


def test_files_and_directories_come_out_byte_identical(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    blob = os.urandom(3 * MiB + 17)
    tar = (Tar().add("", tarfile.DIRTYPE).add("output", tarfile.DIRTYPE).add("output/a.bin", data=blob)
           .add("output/sub/deep/b.txt", data=b"b").add("top.txt", data=b"top").add("output/empty", data=b"")
           .add("output/dir", tarfile.DIRTYPE))
    assert archive.extract_outputs(tar.chunks(4096), root, LimitsConfig()) == []
    tree = _tree(root)
    assert tree["output/a.bin"] == blob and tree["output/sub/deep/b.txt"] == b"b" and tree["top.txt"] == b"top"
    assert tree["output/empty"] == b"" and tree["output/dir"] is None
    assert stat.S_IMODE(os.stat(root / "output/a.bin").st_mode) == 0o600  # the agent's, not the archive's mode
    assert stat.S_IMODE(os.stat(root / "output/sub").st_mode) == 0o700
    assert [f.rel for f in scan_outputs(root, LimitsConfig()).files] == [
        "output/a.bin", "output/empty", "output/sub/deep/b.txt", "top.txt"]


def test_staging_and_hidden_names_are_not_written_nor_mentioned(tmp_path: Path) -> None:
    ws = _staged(tmp_path)
    before = ws.task_json.read_bytes(), sorted(p.name for p in ws.input_dir.iterdir())
    archive.clear_outputs(ws.root)
    tar = (Tar().add("task.json", data=b"forged").add("input/01-in0.txt", data=b"forged")
           .add("input/extra", data=b"x").add(".hidden", data=b"x").add("output/.git/config", data=b"x")
           .add("output/.cache", tarfile.DIRTYPE))
    assert archive.extract_outputs(tar.chunks(), ws.root, LimitsConfig()) == []
    assert (ws.task_json.read_bytes(), sorted(p.name for p in ws.input_dir.iterdir())) == before
    assert not (ws.root / ".hidden").exists() and not (ws.root / "output").exists()


def test_clear_outputs_keeps_only_the_staging(tmp_path: Path) -> None:
    ws = _staged(tmp_path)
    (ws.output_dir / "old").write_text("from an earlier copy-out")
    (ws.root / "top").mkdir()
    archive.clear_outputs(ws.root)
    assert sorted(p.name for p in ws.root.iterdir()) == ["input", "task.json"]


# --- out: hostile entries ---------------------------------------------------------------------


def test_links_devices_fifos_and_escapes_are_skipped_and_listed(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    tar = (Tar().add("output", tarfile.DIRTYPE)
           .add("output/link", tarfile.SYMTYPE, linkname=str(outside))
           .add("output/link/planted", data=b"through the link")  # under a skipped entry: not mentioned
           .add("output/hard", tarfile.LNKTYPE, linkname="/etc/passwd")
           .add("output/hard2", tarfile.LNKTYPE, linkname="../../outside/x")
           .add("output/fifo", tarfile.FIFOTYPE).add("output/null", tarfile.CHRTYPE)
           .add("output/disk", tarfile.BLKTYPE)
           .add("output/../../outside/dotdot", data=b"x")
           .add("/etc/cron.d/evil", data=b"x", whole=True)
           .add("../outside/evil", data=b"x", whole=True)
           .add("podman/style", data=b"no ./ in front", whole=True)
           .add("output/ok", data=b"ok"))
    skipped = archive.extract_outputs(tar.chunks(), root, LimitsConfig())
    assert skipped == sorted([
        Skipped("../outside/evil", archive.DOT_DOT),
        Skipped("/etc/cron.d/evil", archive.ABSOLUTE),
        Skipped("output/disk", "device file"),
        Skipped("output/fifo", "named pipe (FIFO)"),
        Skipped("output/hard", archive.HARD_LINK),
        Skipped("output/hard2", archive.HARD_LINK),
        Skipped("output/link", "symbolic link (never followed)"),
        Skipped("output/null", "device file"),
        Skipped("./output/../../outside/dotdot", archive.DOT_DOT),
    ], key=lambda s: (s.rel, s.reason))
    assert list(outside.iterdir()) == []
    assert _tree(root) == {"output": None, "output/ok": b"ok", "podman": None, "podman/style": b"no ./ in front"}


def test_a_link_planted_in_the_workspace_is_never_written_through(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "output").symlink_to(outside)
    skipped = archive.extract_outputs(Tar().add("output/x", data=b"x").chunks(), root, LimitsConfig())
    assert [s.rel for s in skipped] == ["output/x"] and skipped[0].reason.startswith("cannot write")
    assert list(outside.iterdir()) == []


def test_names_over_the_limits_are_skipped(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    deep = "/".join(["d"] * 70)
    tar = (Tar().add("output/" + "x" * 256, data=b"x").add("output/ctl\nname", data=b"x")
           .add(f"{deep}/f", data=b"x").add(f"{deep}/g", data=b"x"))
    bad_utf8 = _raw_header(b"./output/bad\xff", size=1) + b"x".ljust(512, b"\0")
    skipped = archive.extract_outputs([tar.body() + bad_utf8 + bytes(1024)], root, LimitsConfig())
    assert skipped == [
        Skipped("/".join(["d"] * 65), "nested deeper than 64 directories"),
        Skipped("output/bad\\xff", "name is not valid UTF-8"),
        Skipped("output/ctl\\nname", "name contains control characters"),
        Skipped("output/" + "x" * 256, archive.LONG_NAME),
    ]


def test_a_duplicate_entry_keeps_the_first(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    tar = Tar().add("out", data=b"first").add("out", data=b"second")
    assert archive.extract_outputs(tar.chunks(), root, LimitsConfig()) == [Skipped("out", archive.TWICE)]
    assert (root / "out").read_bytes() == b"first"


def test_the_output_limits_apply_in_the_archive_order(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    limits = LimitsConfig(max_output_files=3, max_output_file_bytes=100, max_output_bytes=150)
    tar = (Tar().add("a", data=b"x" * 101).add("b", data=b"x" * 90).add("c", data=b"x" * 70)
           .add("d", data=b"x" * 10).add("e", data=b"x").add("f", data=b"x"))
    assert archive.extract_outputs(tar.chunks(), root, limits) == [
        Skipped("a", "101 bytes: over the per-file limit of 100"),
        Skipped("c", "70 bytes: would bring the total over 150"),
        Skipped("f", "over the limit of 3 output files"),
    ]
    assert sorted(_tree(root)) == ["b", "d", "e"]


def test_what_is_skipped_reads_as_the_scan_of_the_same_tree(tmp_path: Path) -> None:
    # Given a tree with what a bind-mounted container can leave
    src = tmp_path / "src" / "workspace"
    (src / "output" / "sub").mkdir(parents=True)
    (src / "output" / "a.txt").write_bytes(b"a" * 60)
    (src / "output" / "b.txt").write_bytes(b"b" * 60)
    (src / "output" / "sub" / "c.txt").write_bytes(b"c")
    (src / "output" / "link").symlink_to("/etc/passwd")
    os.mkfifo(src / "output" / "fifo")
    (src / "output" / "ctl\tname").write_bytes(b"x")
    deep = src.joinpath(*["d"] * 66)
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"f")
    limits = LimitsConfig(max_output_bytes=100)
    # When it is scanned in place, and when it comes out of an archive
    scanned = scan_outputs(src, limits)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(src, arcname=".")
    root = _empty_root(tmp_path)
    skipped = archive.extract_outputs([buf.getvalue()], root, limits)
    # Then both list the same entries for the same reasons, and keep the same files
    assert skipped == scanned.skipped
    assert [f.rel for f in scan_outputs(root, limits).files] == [f.rel for f in scanned.files]


def test_an_archive_of_too_many_entries_is_cut_as_a_scan_cuts_it(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    limits = LimitsConfig(max_output_files=5)
    tar = Tar()
    for i in range(archive.wsmod.SCAN_SLACK + 20):
        tar.add(f"l{i:05d}", tarfile.SYMTYPE, linkname="x")
    skipped = archive.extract_outputs(tar.chunks(1 << 20), root, limits)
    assert len(skipped) == archive.wsmod.SCAN_SLACK + 5 + 1
    assert skipped[0] == Skipped(".", "entries not examined: a scan looks at 10005 entries at most", 15)


# --- out: broken archives ------------------------------------------------------------------------


def _raw_header(name: bytes, *, size: int = 0, kind: bytes = b"0", checksum: bool = True) -> bytes:
    """A ustar header written by hand: tarfile would not write these."""
    block = bytearray(512)
    block[0:len(name)] = name[:100]
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = f"{size:011o}\0".encode()
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    total = sum(block) if checksum else sum(block) + 1
    block[148:156] = f"{total:06o}\0 ".encode()
    return bytes(block)


def test_a_truncated_archive_keeps_what_came_whole(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    data = Tar().add("whole", data=b"w").add("half", data=b"h" * 5000).bytes()
    cut = data.index(b"h" * 5000) + 2000
    skipped = archive.extract_outputs([data[:cut]], root, LimitsConfig())
    assert skipped == [Skipped(".", "the rest of the archive is unreadable: the archive ends in the middle "
                                    "of an entry")]
    assert _tree(root) == {"whole": b"w"}  # no half file


@pytest.mark.parametrize("tail, why", [
    (_raw_header(b"./bad", checksum=False), "bad tar header"),
    (_raw_header(b"././@PaxHeader", size=8 * 1024 ** 3 - 1, kind=b"x"), "a header of 8589934591 bytes"),
    (_raw_header(b"././@PaxHeader", size=9, kind=b"x") + b"99 path=x".ljust(512, b"\0"), "malformed PAX"),
    (_raw_header(b"././@PaxHeader", size=11, kind=b"x") + b"11 size=-1\n".ljust(512, b"\0")
     + _raw_header(b"./f"), "PAX size that is not a number"),
    (b"\x01" * 100, "ends in the middle"),
])
def test_a_broken_archive_ends_the_reading(tmp_path: Path, tail: bytes, why: str) -> None:
    root = _empty_root(tmp_path)
    head = Tar().add("first", data=b"1").body()
    tracemalloc.start()
    try:
        skipped = archive.extract_outputs([head, tail], root, LimitsConfig())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(skipped) == 1 and skipped[0].rel == "." and why in skipped[0].reason
    assert _tree(root) == {"first": b"1"}
    assert peak < 4 * MiB  # an 8 GiB header claim is never read into memory


def test_pax_and_gnu_long_names_are_read(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    name = "output/" + "n" * 200
    pax = Tar().add(name, data=b"pax").body()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("./output/" + "g" * 200)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"gnu"))
    assert archive.extract_outputs([pax, buf.getvalue()], root, LimitsConfig()) == []
    assert (root / name).read_bytes() == b"pax" and (root / "output" / ("g" * 200)).read_bytes() == b"gnu"


def test_a_failing_stream_leaves_no_half_file_and_passes_its_error_on(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    data = Tar().add("big", data=b"b" * 10000).bytes()

    def chunks() -> Iterator[bytes]:
        yield data[:3000]
        raise ConnectionResetError("engine gone")

    with pytest.raises(ConnectionResetError):
        archive.extract_outputs(chunks(), root, LimitsConfig())
    assert _tree(root) == {}


def test_a_big_file_comes_out_with_flat_memory(tmp_path: Path) -> None:
    root = _empty_root(tmp_path)
    size = 256 * MiB
    info = tarfile.TarInfo("./big")
    info.size = size
    header = info.tobuf(tarfile.PAX_FORMAT)

    def chunks() -> Iterator[bytes]:
        yield header
        zero = bytes(2 * MiB)
        for _ in range(size // len(zero)):
            yield zero
        yield bytes(1024)

    tracemalloc.start()
    try:
        assert archive.extract_outputs(chunks(), root, LimitsConfig()) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.stat(root / "big").st_size == size
    assert peak < 16 * MiB
