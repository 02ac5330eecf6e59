"""Workspaces through the engine's API (`executor.workspace = "copy"`): tar streams, both ways.

Pure filesystem logic, no engine: the runner hands the streams to `Backend.put_archive` and
takes them from `Backend.get_archive`. Both directions stream in chunks, so a 1 GiB file costs
one chunk of memory.

* In: `workspace_tar` yields `task.json`, `input/` and an empty `output/` as a tar stream to
  unpack at /workspace, with the modes the agent gave them on disk (those a bind mount would
  show) and owned by root: the only uid that means the same on every engine. The agent wrote
  these files itself, before any container ran; they are opened O_NOFOLLOW all the same.
* Out: `extract_outputs` reads what `get_archive` returns for /workspace as hostile input: a
  small tar parser of its own (Python's tarfile would keep a PAX header of any size in memory,
  and makes links). Only regular files and directories are written, only under the task's
  workspace, each created O_CREAT|O_EXCL|O_NOFOLLOW through directory fds opened O_NOFOLLOW.
  Everything else is skipped and listed as `workspace.scan_outputs` lists what it skips, with
  its reasons, and `limits.*` apply as there, in the archive's order (the first files fit).
  What a scan never calls an output (task.json and input/ at the root, hidden names) is not
  written at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from agent_core import workspace as wsmod
from agent_core.config import WORKSPACE_MODES, LimitsConfig
from agent_core.errors import UnsafePath, WorkspaceError
from agent_core.fsutil import write_atomic
from agent_core.workspace import Skipped

BIND, COPY = WORKSPACE_MODES  # the values of executor.workspace
CHUNK = 1024 * 1024
BLOCK = 512
NAME_MAX = 255  # bytes in one path component, as Linux allows
MAX_HEADER_BYTES = 1024 * 1024  # a PAX or GNU long-name header; Docker's are a few KiB at most
# What to copy out: the contents of /workspace, named relative to it ("./x" from Docker, "x" from
# Podman, which names the entries of a mount point "/x" when asked for "/workspace" itself).
COPY_OUT_PATH = wsmod.WORKSPACE_MOUNT + "/."

_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_HEADER_ONLY = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE,
                tarfile.FIFOTYPE)  # no data follows them, whatever their size field says
_META = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
         tarfile.GNUTYPE_LONGLINK)
# what a tar entry would be on disk, for the scan's own words (workspace.kind_reason)
_TAR_KINDS = {tarfile.SYMTYPE: stat.S_IFLNK, tarfile.FIFOTYPE: stat.S_IFIFO, tarfile.CHRTYPE: stat.S_IFCHR,
              tarfile.BLKTYPE: stat.S_IFBLK}
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Reasons only an archive can give (a scan of a folder never meets these)
HARD_LINK = "hard link (never followed)"
ABSOLUTE = "absolute name (never written)"
DOT_DOT = "name with a '..' component (never written)"
TWICE = "in the archive twice (the first one is kept)"
LONG_NAME = f"name component longer than {NAME_MAX} bytes"


# --- in: the workspace as a tar stream ------------------------------------------


def workspace_tar(root: Path) -> Iterator[bytes]:
    """`task.json`, `input/` (recursively) and `output/` (empty) of the workspace at `root`, as a tar
    stream of names relative to /workspace, in chunks of at most CHUNK bytes."""
    try:
        root_fd = os.open(root, _O_DIR)
    except OSError as e:
        raise wsmod.os_error(f"cannot read workspace {root}", e) from None
    try:
        yield from _tar_entry(root_fd, wsmod.TASK_JSON, wsmod.TASK_JSON)
        yield from _tar_entry(root_fd, wsmod.INPUT_DIR, wsmod.INPUT_DIR)
        yield from _tar_entry(root_fd, wsmod.OUTPUT_DIR, wsmod.OUTPUT_DIR, recurse=False)
        yield _ZERO_BLOCK * 2
    finally:
        os.close(root_fd)


def _header(rel: str, st: os.stat_result, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(rel)
    info.type, info.size, info.mode, info.mtime = kind, size, stat.S_IMODE(st.st_mode), int(st.st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _tar_entry(dir_fd: int, name: str, rel: str, *, recurse: bool = True) -> Iterator[bytes]:
    """One entry of the agent's own staging, opened O_NOFOLLOW|O_NONBLOCK: a regular file or a directory."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        raise wsmod.os_error(f"cannot read {rel}", e) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            yield _header(rel + "/", st, tarfile.DIRTYPE, 0)
            if recurse:
                for child in sorted(os.listdir(fd)):
                    yield from _tar_entry(fd, child, f"{rel}/{child}")
        elif stat.S_ISREG(st.st_mode):
            yield _header(rel, st, tarfile.REGTYPE, st.st_size)
            yield from _file_chunks(fd, st.st_size, rel)
        else:
            raise UnsafePath(f"{rel} in the workspace is not a file or folder of the agent: "
                             f"{wsmod.kind_reason(st.st_mode)}")
    finally:
        os.close(fd)


def _file_chunks(fd: int, size: int, rel: str) -> Iterator[bytes]:
    """Exactly `size` bytes of the file, then the padding to the next block."""
    left = size
    while left:
        chunk = os.read(fd, min(CHUNK, left))
        if not chunk:
            raise WorkspaceError(f"{rel} shrank while it was being sent ({size} bytes expected)")
        left -= len(chunk)
        yield chunk
    if size % BLOCK:
        yield bytes(BLOCK - size % BLOCK)


# --- out: a hostile tar stream into the workspace ----------------------------------


class _Broken(Exception):
    """The archive cannot be read further."""


class _Stream:
    """Exact reads from an iterator of byte chunks, holding one chunk at a time."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._chunk = memoryview(b"")

    def _fill(self) -> bool:
        while not self._chunk:
            nxt = next(self._chunks, None)
            if nxt is None:
                return False
            self._chunk = memoryview(bytes(nxt))
        return True

    def pieces(self, n: int) -> Iterator[memoryview]:
        """The next `n` bytes, in pieces; _Broken if the stream ends first."""
        while n:
            if not self._fill():
                raise _Broken("the archive ends in the middle of an entry")
            piece, self._chunk = self._chunk[:n], self._chunk[n:]
            n -= len(piece)
            yield piece

    def read(self, n: int) -> bytes:
        return b"".join(self.pieces(n))

    def at_end(self) -> bool:
        return not self._fill()


@dataclass
class _Member:
    name: str  # as in the archive, undecodable bytes kept as surrogates
    type: bytes
    size: int
    data: Iterator[memoryview]  # the member's bytes: read them, or they are discarded


def _pax_records(data: bytes) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records (POSIX pax), strictly."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            raise _Broken("a PAX header record without a length")
        end = pos + int(data[pos:space])
        if end <= space or end > len(data) or data[end - 1:end] != b"\n" or b"=" not in data[space + 1:end]:
            raise _Broken("a malformed PAX header record")
        key, _, value = data[space + 1:end - 1].partition(b"=")
        records[key.decode("ascii", "replace")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _members(stream: _Stream) -> Iterator[_Member]:
    """Each entry of the tar stream; long names (PAX, GNU) resolved, bounded by MAX_HEADER_BYTES."""
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        if stream.at_end():
            return
        block = stream.read(BLOCK)
        if block == _ZERO_BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise _Broken(f"a bad tar header ({e})") from None
        size = info.size
        if info.type in _META:
            if not 0 <= size <= MAX_HEADER_BYTES:
                raise _Broken(f"a header of {size} bytes (at most {MAX_HEADER_BYTES})")
            data = stream.read(-(-size // BLOCK) * BLOCK)[:size]
            if info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                pax.update(_pax_records(data))
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue  # a global header (XGLTYPE) or a long link name: nothing to keep
        name = pax.get("path") or long_name or info.name
        if "size" in pax:
            if not pax["size"].isdigit():
                raise _Broken("a PAX size that is not a number")
            size = int(pax["size"])
        if size < 0:
            raise _Broken("a negative size")
        if info.type in _HEADER_ONLY:
            size = 0
        pax, long_name = {}, None
        data = stream.pieces(size)
        yield _Member(name, info.type, size, data)
        for _ in data:  # whatever the consumer left
            pass
        stream.read(-size % BLOCK)


@dataclass
class _Extractor:
    root_fd: int
    limits: LimitsConfig
    skipped: list[Skipped] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)  # skipped entries: what is under them is not looked at
    kept_files: int = 0
    kept_bytes: int = 0
    examined: int = 0
    not_examined: int = 0

    @property
    def max_entries(self) -> int:
        return self.limits.max_output_files + wsmod.SCAN_SLACK

    def skip(self, rel: str, reason: str) -> None:
        self.gone.add(rel)
        self.skipped.append(Skipped(wsmod.printable(rel) or ".", reason))

    def entry(self, member: _Member) -> None:
        parts = self._parts(member.name)
        if parts is None:
            return
        rel = "/".join(parts)
        if self.examined >= self.max_entries:
            self.not_examined += 1
            return
        self.examined += 1
        reason = self._refusal(parts, member)
        if reason:
            self.skip(rel, reason)
        elif member.type == tarfile.DIRTYPE:
            self._write(parts, None)
        else:
            self._write(parts, member)

    def _parts(self, name: str) -> list[str] | None:
        """The workspace-relative components of an entry worth looking at; None for one a scan would
        not mention (the root, task.json, input/, hidden, under a skipped entry); refusals are listed."""
        if name.startswith("/"):
            self.skip(name, ABSOLUTE)
            return None
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            self.skip(name, DOT_DOT)
            return None
        if not parts or parts[0] in wsmod.ROOT_EXCLUDED or any(p.startswith(".") for p in parts):
            return None
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in self.gone:
                return None
        if len(parts) - 1 > wsmod.MAX_DEPTH:  # the directory a scan would not enter
            self.skip("/".join(parts[:wsmod.MAX_DEPTH + 1]), wsmod.depth_reason())
            return None
        return parts

    def _refusal(self, parts: list[str], member: _Member) -> str | None:
        for part in parts:
            problem = wsmod.name_problem(part)
            if problem:
                return problem
            if len(part.encode("utf-8")) > NAME_MAX:
                return LONG_NAME
        if member.type == tarfile.LNKTYPE:
            return HARD_LINK
        if member.type == tarfile.DIRTYPE:
            if len(parts) > wsmod.MAX_DEPTH:
                return wsmod.depth_reason()
            return None
        if member.type not in _REGULAR:
            return wsmod.kind_reason(_TAR_KINDS.get(member.type, 0))
        return wsmod.cap_reason(member.size, self.kept_files, self.kept_bytes, self.limits)

    def _write(self, parts: list[str], member: _Member | None) -> None:
        """Make the directories of `parts` (all of them when `member` is None), then the file."""
        rel = "/".join(parts)
        fd = os.dup(self.root_fd)
        try:
            for part in parts if member is None else parts[:-1]:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                sub = os.open(part, _O_DIR, dir_fd=fd)  # O_NOFOLLOW: never through a link
                os.close(fd)
                fd = sub
        except OSError as e:
            os.close(fd)
            self._failed(rel, e)
            return
        try:
            if member is not None:
                self._write_file(fd, parts[-1], rel, member)
        finally:
            os.close(fd)

    def _failed(self, rel: str, e: OSError) -> None:
        """A write the filesystem refused: the entry is skipped, unless the disk is full."""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise wsmod.os_error(f"cannot write output {wsmod.printable(rel)}", e) from None
        self.skip(rel, TWICE if e.errno == errno.EEXIST else f"cannot write: {e.strerror}")

    def _write_file(self, dir_fd: int, name: str, rel: str, member: _Member) -> None:
        try:
            fd = os.open(name, _O_NEW_FILE, 0o600, dir_fd=dir_fd)
        except OSError as e:
            self._failed(rel, e)
            return
        done = False
        try:
            for piece in member.data:  # the stream's own errors (the engine's) pass through untouched
                try:
                    while piece:
                        piece = piece[os.write(fd, piece):]
                except OSError as e:
                    self._failed(rel, e)
                    return
            done = True
        finally:
            os.close(fd)
            if not done:  # a refused write, or the stream broke: no half file stays
                os.unlink(name, dir_fd=dir_fd)
        self.kept_files += 1
        self.kept_bytes += member.size

    def finish(self) -> list[Skipped]:
        if self.not_examined:
            self.skipped.append(Skipped(".", wsmod.not_examined_reason(self.max_entries), self.not_examined))
        return wsmod.sorted_skipped(self.skipped)


def clear_outputs(root: Path) -> None:
    """Remove everything but the staging (task.json, input/) from the workspace at `root`: what an
    earlier, interrupted copy-out left, before the next one. Never follows a link."""
    try:
        names = os.listdir(root)
    except OSError as e:
        raise wsmod.os_error(f"cannot read workspace {root}", e) from None
    for name in names:
        if name not in wsmod.ROOT_EXCLUDED:
            wsmod.remove_workspace(Path(root) / name)


def extract_outputs(chunks: Iterable[bytes], root: Path, limits: LimitsConfig) -> list[Skipped]:
    """Write the regular files and directories of `chunks` (get_archive of COPY_OUT_PATH) under `root`
    (the task's workspace, holding nothing but its staging); return what was skipped, as
    `scan_outputs` lists it. An unreadable archive ends the reading: what came before stays,
    the rest is one skipped entry. `DiskFull` when the disk fills (no half file stays); errors of
    the stream itself (the engine's) pass through."""
    try:
        root_fd = os.open(root, _O_DIR)
    except OSError as e:
        raise wsmod.os_error(f"cannot open workspace {root}", e) from None
    extractor = _Extractor(root_fd, limits)
    read = 0
    try:
        for member in _members(_Stream(chunks)):
            read += 1
            if read > wsmod.MAX_NAMES_READ:
                extractor.skipped.append(Skipped(".", wsmod.listing_stopped_reason()))
                break
            extractor.entry(member)
    except _Broken as e:
        extractor.skipped.append(Skipped(".", f"the rest of the archive is unreadable: {e}"))
    finally:
        os.close(root_fd)
    return extractor.finish()


def save_skipped(path: Path, skipped: list[Skipped]) -> None:
    """What `extract_outputs` skipped, kept (atomically) in the agent's own folder for the upload
    stage, which may run after a restart."""
    try:
        write_atomic(path, json.dumps([[s.rel, s.reason, s.count] for s in skipped]))
    except OSError as e:
        raise wsmod.os_error(f"cannot write {path}", e) from None


def load_skipped(path: Path) -> list[Skipped]:
    """What `save_skipped` kept; none when nothing was copied out (the task ended before)."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise WorkspaceError(f"cannot read {path}: {e}") from None
    return [Skipped(str(rel), str(reason), int(count)) for rel, reason, count in entries]
