"""A task's directory on the host: layout, safe names, task.json, output scanning, removal.

Pure filesystem logic (no HTTP, no Docker). The layout is the executor contract of
protocol.md §5:

    <data_dir>/workspaces/<task_id>/      bind-mounted at /workspace: the container's to write
        task.json                         what the task is (never an output)
        input/NN-<safe name>              downloaded inputs (never outputs)
        output/                           empty and writable by any uid
    <data_dir>/tasks/<task_id>/           the agent's own files for the task (0700, never mounted)
        stdout.log, stderr.log            the container's logs, capped
        copy-skipped.json                 copy mode: what the copy-out left in the container, and why

The rule for every path here: once a container has run, everything under its workspace is
hostile (it runs as root inside and can plant links, FIFOs and devices at any name). So the
agent writes nothing there after launch; its own files live in `tasks/`, which no container
sees, and are still created O_NOFOLLOW|O_CREAT|O_EXCL through a directory fd (`create_private`)
and read O_NOFOLLOW|O_NONBLOCK with an S_ISREG check (`read_tail`). Inputs are written before
launch, still O_NOFOLLOW (`open_input`). In the workspace,
`scan_outputs` reads metadata only and never follows a symlink, `open_output` re-checks a file
when it is opened for upload, and `remove_workspace` never follows a link while deleting. Only
names that were sanitised (`safe_name`) or checked (`check_task_id`) are joined into paths.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import json
import os
import re
import shutil
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from agent_core.config import LimitsConfig
from agent_core.errors import DiskFull, UnsafePath, WorkspaceError
from agent_core import fsutil
from agent_core.fsutil import write_atomic
from agent_core.protocol import Task

WORKSPACES_DIR = "workspaces"
TASKS_DIR = "tasks"
TASK_JSON = "task.json"
INPUT_DIR = "input"
OUTPUT_DIR = "output"
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
COPY_SKIPPED = "copy-skipped.json"
WORKSPACE_MOUNT = "/workspace"  # where the container sees the workspace

# A task id becomes a directory name and part of a container name (`agent-core-<owner>-<id>`);
# Docker allows [a-zA-Z0-9][a-zA-Z0-9_.-]+ there, and a leading alphanumeric rules out "." and "..".
_TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_NAME_PUNCT = frozenset("._-+ ()[]@,=")
MAX_NAME_BYTES = 150  # leaves room for the "NNN-" prefix under the usual 255-byte NAME_MAX
_MAX_EXT_BYTES = 16   # a longer "extension" is just part of the name

# Scan limits besides LimitsConfig. The walk looks at no more than max_output_files + SCAN_SLACK
# entries (the slack covers directories, links and files that end up skipped), reads at most
# MAX_NAMES_READ names in all, and descends at most MAX_DEPTH directories: a container that
# writes a million files or a very deep tree costs a bounded amount of memory and time.
SCAN_SLACK = 10_000
MAX_NAMES_READ = 1_000_000
MAX_DEPTH = 64
_MAX_UNLOCK_DEPTH = 200  # one fd per level while unlocking; deeper trees are left to rmtree
ROOT_EXCLUDED = frozenset({TASK_JSON, INPUT_DIR})

_O_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_PATH opens a directory for use as dir_fd without needing read permission on it.
_O_WALK = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LINK_ERRNOS = {errno.ELOOP, errno.ENOTDIR, errno.EMLINK}  # what O_NOFOLLOW/O_DIRECTORY say about a link


def _shorten(value: object, limit: int = 40) -> str:
    """repr of at most `limit` characters of a value from outside, for error messages."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def check_task_id(value: object) -> str:
    """The task id if it is safe as a directory and container name; `UnsafePath` otherwise."""
    if not isinstance(value, str):
        raise UnsafePath(f"task id must be a string (got {type(value).__name__})")
    if not _TASK_ID_RE.fullmatch(value):
        raise UnsafePath(f"unsafe task id {_shorten(value)}: expected 1-128 characters "
                         "of A-Z a-z 0-9 _ . - starting with a letter or digit")
    return value


def safe_name(name: str) -> str:
    """One harmless path component made from a filename the server (i.e. some client) chose."""
    name = unicodedata.normalize("NFC", str(name))
    name = "".join(ch for ch in name if unicodedata.category(ch) != "Cc")  # NUL, newlines, escapes
    name = next((part for part in reversed(re.split(r"[/\\]", name)) if part), "")
    # Letters, digits and combining marks of any script stay; everything else (emoji, shell
    # metacharacters, look-alike slashes, lone surrogates) becomes "_".
    name = "".join(ch if ch in _NAME_PUNCT or unicodedata.category(ch)[0] in "LNM" else "_"
                   for ch in name)
    name = name.lstrip(". ").rstrip(" ")  # no hidden files, no "." or ".."
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        if not (dot and stem and len(ext.encode("utf-8")) < _MAX_EXT_BYTES):
            stem, ext = name, ""
        suffix = "." + ext if ext else ""
        budget = MAX_NAME_BYTES - len(suffix.encode("utf-8"))
        stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore").rstrip(" ")
        name = stem + suffix
    return name or "file"


def os_error(what: str, e: OSError) -> WorkspaceError:
    """Translate an OSError at this module's edge; a full disk gets its own class."""
    cls = DiskFull if e.errno in (errno.ENOSPC, errno.EDQUOT) else WorkspaceError
    return cls(f"{what}: {e.strerror or e}")


def _mkdir(path: Path, mode: int, *, force_mode: bool) -> None:
    """mkdir that refuses an existing symlink; `force_mode` sets `mode` exactly, whatever the umask."""
    try:
        os.mkdir(path, mode)
        created = True
    except FileExistsError:
        created = False
    if not (created or force_mode):
        return
    try:
        fd = os.open(path, _O_NOFOLLOW_DIR)
    except OSError as e:
        if e.errno in _LINK_ERRNOS:
            raise UnsafePath(f"{path} is not a directory (a symlink or file is in the way)") from None
        raise
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Workspace:
    """One task's directories; build it with `Workspace.for_task`."""

    root: Path  # the container's workspace
    meta: Path  # the agent's own files for the task

    @classmethod
    def for_task(cls, data_dir: Path | str, task_id: str) -> Workspace:
        check_task_id(task_id)
        dirs = []
        for folder in (WORKSPACES_DIR, TASKS_DIR):
            base = (Path(data_dir) / folder).resolve()
            path = (base / task_id).resolve()
            # resolve() follows a symlink planted at the task's path: the result must still sit
            # directly under its folder.
            if path.parent != base or path.name != task_id:
                raise UnsafePath(f"{folder} entry for task {_shorten(task_id)} would be outside {base}")
            dirs.append(path)
        return cls(*dirs)

    @property
    def task_id(self) -> str:
        return self.root.name

    @property
    def input_dir(self) -> Path:
        return self.root / INPUT_DIR

    @property
    def output_dir(self) -> Path:
        return self.root / OUTPUT_DIR

    @property
    def task_json(self) -> Path:
        return self.root / TASK_JSON

    @property
    def stdout_log(self) -> Path:
        return self.meta / STDOUT_LOG

    @property
    def stderr_log(self) -> Path:
        return self.meta / STDERR_LOG

    @property
    def copy_skipped(self) -> Path:
        return self.meta / COPY_SKIPPED

    def exists(self) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self.root).st_mode)
        except FileNotFoundError:
            return False

    def create(self) -> None:
        """Make the layout; safe to call again on an existing workspace.

        The data dir and workspaces/ are 0700: only the agent looks there. The container does
        not need them, because a bind mount is entered at /workspace and the host directories
        above it are never traversed from inside. The container may run as any uid, though
        (executor.user, or the image's USER), so the task root and input/ are 0755 (readable)
        and output/ is 0777 (writable). Modes are set explicitly, so the umask does not matter.
        The agent's own folder for the task (tasks/<id>) is 0700 and never mounted.
        """
        try:
            self.root.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _mkdir(self.root.parent, 0o700, force_mode=False)
            _mkdir(self.root, 0o755, force_mode=True)
            _mkdir(self.input_dir, 0o755, force_mode=True)
            _mkdir(self.output_dir, 0o777, force_mode=True)
            _mkdir(self.meta.parent, 0o700, force_mode=False)
            _mkdir(self.meta, 0o700, force_mode=True)
        except OSError as e:
            raise os_error(f"cannot create workspace {self.root}", e) from None

    def input_path(self, index: int, filename: str, *, count: int = 0) -> tuple[str, Path]:
        """("input/NN-name", absolute path) for the `index`-th input (1-based, server order).

        NN has two digits, or as many as `count` (the number of inputs) needs, so that
        input/001-... sorts before input/100-... when a task has more than 99 files.
        """
        if isinstance(index, bool) or not isinstance(index, int) or index < 1:
            raise ValueError(f"input index must be an integer ≥ 1 (got {index!r})")
        width = max(2, len(str(max(index, count))))
        name = f"{index:0{width}d}-{safe_name(filename)}"
        path = self.input_dir / name
        if path.parent != self.input_dir or os.path.normpath(path) != str(path):
            raise UnsafePath(f"input name {_shorten(filename)} would escape {self.input_dir}")
        return f"{INPUT_DIR}/{name}", path

    def write_task_json(self, task: Task, local_paths: list[str]) -> None:
        """task.json as in protocol.md §5, atomically (an executor never sees half a file)."""
        if task.id != self.task_id:
            raise ValueError(f"task {task.id!r} does not belong to workspace {self.root}")
        if len(local_paths) != len(task.input_files):
            raise ValueError(f"{len(task.input_files)} input files but {len(local_paths)} local paths")
        doc = {
            "task_id": task.id,
            "task_prompt": task.task_prompt,
            "prompt": task.task_prompt,
            "output_prompt": task.output_prompt,
            "session_id": task.session_id,
            "input_files": [
                {"id": f.id, "filename": f.filename, "mime_type": f.mime_type,
                 "size_bytes": f.size_bytes, "local_path": local}
                for f, local in zip(task.input_files, local_paths)
            ],
        }
        text = json.dumps(doc, indent=2, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from the server's JSON: escape them instead
            text = json.dumps(doc, indent=2)
        try:
            # The temp file is ".task.json.*": hidden, so a crash never leaves a fake output.
            write_atomic(self.task_json, text + "\n", mode=0o644)
        except OSError as e:
            raise os_error(f"cannot write {self.task_json}", e) from None


    def create_log(self, name: str) -> BinaryIO:
        """A new, empty file of the agent's own in tasks/<id> (STDOUT_LOG, STDERR_LOG)."""
        return create_private(self.meta, name)


def create_private(directory: Path, name: str) -> BinaryIO:
    """Create `directory/name` afresh, 0600, never through a link: whatever sat at the name (an
    older copy, or anything planted) is unlinked first, then O_CREAT|O_EXCL|O_NOFOLLOW through a
    directory fd opened O_NOFOLLOW, so neither the folder nor the file can be redirected."""
    if name != safe_name(name) or name.startswith("."):
        raise ValueError(f"not a plain file name: {name!r}")
    try:
        dir_fd = os.open(directory, _O_NOFOLLOW_DIR)
        try:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise os_error(f"cannot create {directory / name}", e) from None
    return os.fdopen(fd, "w+b")


def open_input(path: Path) -> BinaryIO:
    """`path` (from `Workspace.input_path`) opened empty for a download, once per attempt.
    No container has run yet, but O_NOFOLLOW all the same: a link there is never written through.
    0644 whatever the umask: the container may run as another user."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        os.fchmod(fd, 0o644)
    except OSError as e:
        raise os_error(f"cannot write input file {path.name}", e) from None
    return os.fdopen(fd, "wb")


def read_tail(path: Path, max_bytes: int) -> str:
    """The last `max_bytes` of a file as text; '' when it is missing, not a regular file (a link,
    a FIFO: never followed, never waited on) or unreadable."""
    try:
        with open_output(path) as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - max_bytes))
            return f.read(max_bytes).decode("utf-8", errors="replace")
    except (WorkspaceError, OSError):
        return ""


# --- scanning outputs ----------------------------------------------------


@dataclass(frozen=True)
class OutputFile:
    rel: str    # workspace-relative, "/" separators: the upload's filename
    path: Path  # absolute, under the resolved workspace root: give this to open_output()
    size: int   # at scan time


@dataclass(frozen=True)
class Skipped:
    rel: str     # printable (escaped) workspace-relative path; "." is the root
    reason: str
    count: int = 1  # > 1 when one entry stands for many (a directory's unexamined rest)


def sorted_skipped(entries: list[Skipped]) -> list[Skipped]:
    """Skipped entries in the order a result lists them."""
    return sorted(entries, key=lambda s: (s.rel, s.reason))


@dataclass(frozen=True)
class ScanResult:
    files: list[OutputFile] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def with_skipped(self, more: list[Skipped]) -> ScanResult:
        """This result with `more` skipped entries (what a copy-out left behind), in the one order."""
        return ScanResult(self.files, sorted_skipped(self.skipped + more))

    def summary(self, limit: int = 100) -> dict[str, Any]:
        """What was left out, JSON-able, for the task's output: at most `limit` entries plus a count."""
        entries = []
        for s in self.skipped[:limit]:
            entry: dict[str, Any] = {"path": s.rel, "reason": s.reason}
            if s.count > 1:
                entry["count"] = s.count
            entries.append(entry)
        return {"skipped": entries, "skipped_count": sum(s.count for s in self.skipped)}


def printable(text: str) -> str:
    """A name from disk made safe to log and to put in JSON: bad bytes and controls escaped."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc"
                   else ch for ch in text)


def name_problem(name: str) -> str | None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "name contains control characters"
    return None


def not_examined_reason(max_entries: int) -> str:
    return f"entries not examined: a scan looks at {max_entries} entries at most"


def listing_stopped_reason() -> str:
    return f"listing stopped: the scan reads at most {MAX_NAMES_READ} names"


def depth_reason() -> str:
    return f"nested deeper than {MAX_DEPTH} directories"


def cap_reason(size: int, kept_files: int, kept_bytes: int, limits: LimitsConfig) -> str | None:
    """Why a file of `size` bytes cannot be an output after `kept_files` files of `kept_bytes`; None if it can."""
    if limits.max_output_file_bytes and size > limits.max_output_file_bytes:
        return f"{size} bytes: over the per-file limit of {limits.max_output_file_bytes}"
    if kept_files >= limits.max_output_files:
        return f"over the limit of {limits.max_output_files} output files"
    if kept_bytes + size > limits.max_output_bytes:
        return f"{size} bytes: would bring the total over {limits.max_output_bytes}"
    return None


def kind_reason(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link (never followed)"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        return "device file"
    return "not a regular file"


class _Walker:
    """Depth-first walk over directory fds; collects candidate files before the caps apply."""

    def __init__(self, root: Path, entry_budget: int):
        self.root = root
        self.max_entries = entry_budget
        self.entry_budget = entry_budget  # entries we may still lstat
        self.names_left = MAX_NAMES_READ  # names we may still read from directories
        self.found: list[OutputFile] = []
        self.skipped: list[Skipped] = []

    def skip(self, rel: str, reason: str, count: int = 1) -> None:
        self.skipped.append(Skipped(printable(rel) or ".", reason, count))

    def _list(self, dir_fd: int, rel_dir: str) -> list[str]:
        """The smallest candidate names of a directory, within budget, sorted.

        Every name is read once (up to names_left), but only the `entry_budget` smallest are
        kept (a heap), so memory stays bounded and the choice does not depend on readdir order.
        """
        at_root = rel_dir == ""
        candidates = read = 0

        def names(it: Iterator[os.DirEntry[str]]) -> Iterator[str]:
            nonlocal candidates, read
            for entry in itertools.islice(it, self.names_left):
                read += 1
                name = entry.name
                if name.startswith(".") or (at_root and name in ROOT_EXCLUDED):
                    continue  # hidden, task.json, input/: never outputs, not worth a mention
                candidates += 1
                yield name

        with os.scandir(dir_fd) as it:
            gen = names(it)
            kept = heapq.nsmallest(self.entry_budget, gen)
            collections.deque(gen, maxlen=0)  # count the rest without keeping it
            cut_short = read == self.names_left and next(it, None) is not None
        self.names_left -= read
        self.entry_budget -= len(kept)
        if candidates > len(kept):
            self.skip(rel_dir, not_examined_reason(self.max_entries), candidates - len(kept))
        if cut_short:
            self.skip(rel_dir, listing_stopped_reason())
        return kept

    def walk(self, dir_fd: int, rel_dir: str, depth: int) -> None:
        for name in self._list(dir_fd, rel_dir):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            problem = name_problem(name)
            if problem:
                self.skip(rel, problem)
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as e:
                self.skip(rel, f"cannot stat: {e.strerror}")
                continue
            if stat.S_ISREG(st.st_mode):
                self.found.append(OutputFile(rel, self.root / rel, st.st_size))
            elif stat.S_ISDIR(st.st_mode):
                if depth + 1 > MAX_DEPTH:
                    self.skip(rel, depth_reason())
                    continue
                try:
                    # O_NOFOLLOW: if the directory was swapped for a link since the lstat, this fails.
                    sub = os.open(name, _O_NOFOLLOW_DIR, dir_fd=dir_fd)
                except OSError as e:
                    self.skip(rel, f"cannot open directory: {e.strerror}")
                    continue
                try:
                    self.walk(sub, rel, depth + 1)
                finally:
                    os.close(sub)
            else:
                self.skip(rel, kind_reason(st.st_mode))


def scan_outputs(root: Path, limits: LimitsConfig) -> ScanResult:
    """Every regular file the task left in its workspace, sorted, within `limits`.

    Reads metadata only (scandir names + lstat through directory fds); never follows a
    symlink, never opens a file. Not outputs, silently: task.json at the root, the input/
    tree, anything hidden (a component starting with "."). Skipped with a reason: links,
    FIFOs, sockets, devices, undecodable or control-character names, unreadable or too
    deep directories, and files over the per-file, count or total caps. The caps are applied
    in sorted order, so the same tree always gives the same result.
    """
    root = Path(root).absolute()
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            raise UnsafePath(f"workspace {root} is not a directory")
        root = root.resolve()  # only the agent-made part above the root can hold links
        fd = os.open(root, _O_NOFOLLOW_DIR)
    except OSError as e:
        raise os_error(f"cannot scan workspace {root}", e) from None
    walker = _Walker(root, limits.max_output_files + SCAN_SLACK)
    try:
        walker.walk(fd, "", 0)
    except OSError as e:
        raise os_error(f"cannot scan workspace {root}", e) from None
    finally:
        os.close(fd)

    files: list[OutputFile] = []
    total = 0
    for f in sorted(walker.found, key=lambda f: f.rel):
        reason = cap_reason(f.size, len(files), total, limits)
        if reason:
            walker.skip(f.rel, reason)
        else:
            files.append(f)
            total += f.size
    return ScanResult(files, sorted_skipped(walker.skipped))


def open_output(path: Path, expected_size: int | None = None) -> BinaryIO:
    """Open an output file for upload, checking again what the scan saw.

    `path` must be absolute and free of symlinks (OutputFile.path is). Every directory on the
    way is opened with O_NOFOLLOW from "/" down, and the file itself with O_NOFOLLOW|O_NONBLOCK
    (a FIFO cannot block us), then fstat must show the same regular file: something may have
    swapped it for a link, FIFO or device after the scan. `UnsafePath` whenever the file is not
    what the scan saw (a link on the way, not a regular file, vanished, size no longer
    `expected_size`); `WorkspaceError` for other I/O errors such as EACCES. Either way: skip it.
    """
    path = Path(path)
    if not path.is_absolute() or os.path.normpath(path) != str(path) or len(path.parts) < 2:
        raise UnsafePath(f"not a plain absolute path: {_shorten(str(path), 200)}")
    shown = printable(str(path))
    try:
        dir_fd = os.open("/", _O_WALK)
        try:
            for part in path.parts[1:-1]:
                next_fd = os.open(part, _O_WALK, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = next_fd
            before = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(before.st_mode):  # refuse before opening: no open() on a device
                raise UnsafePath(f"{shown} is no longer a regular file: {kind_reason(before.st_mode)}")
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                         | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno in _LINK_ERRNOS:
            raise UnsafePath(f"{shown}: a symbolic link or non-directory is in the path") from None
        if e.errno == errno.ENOENT:
            raise UnsafePath(f"{shown} vanished after the scan") from None
        raise os_error(f"cannot open output {shown}", e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise UnsafePath(f"{shown} changed while it was being opened")
        if expected_size is not None and st.st_size != expected_size:
            raise UnsafePath(f"{shown} changed since the scan ({expected_size} → {st.st_size} bytes)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# --- removal and disk space ---------------------------------------------------


def _unlock_dirs(root: Path) -> None:
    """Give every directory we own u+rwx, never following a link, so rmtree can empty it.

    A container (often root inside) can leave directories at 0500 or 0000. Each directory is
    opened O_PATH|O_NOFOLLOW (no read permission needed) and chmod-ed through /proc/self/fd,
    which names exactly the opened inode: a link swapped in cannot redirect the chmod.
    """
    def unlock(fd: int) -> None:
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o700 != 0o700:
                os.chmod(f"/proc/self/fd/{fd}", mode | 0o700)
        except OSError:
            pass  # not ours, or no /proc: rmtree will report what is left

    def walk(fd: int, depth: int) -> None:
        unlock(fd)
        if depth >= _MAX_UNLOCK_DEPTH:
            return
        try:
            read_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            return
        try:
            names = os.listdir(read_fd)
        except OSError:
            names = []
        finally:
            os.close(read_fd)
        for name in names:
            try:
                sub = os.open(name, _O_WALK, dir_fd=fd)
            except OSError:
                continue  # not a directory, or a link: nothing to unlock
            try:
                walk(sub, depth + 1)
            finally:
                os.close(sub)

    try:
        fd = os.open(root, _O_WALK)
    except OSError:
        return
    try:
        walk(fd, 0)
    finally:
        os.close(fd)


def remove_workspace(root: Path) -> None:
    """Delete a workspace tree; nothing if it is already gone; never follows a symlink.

    shutil.rmtree works through directory fds on Linux and unlinks links instead of following
    them. If it fails (directories left read-only by the container), unlock and try once more.
    """
    root = Path(root)
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            os.unlink(root)  # a link or file where the workspace was: remove the entry, not its target
            return
    except FileNotFoundError:
        return
    except OSError as e:
        raise os_error(f"cannot remove workspace {root}", e) from None
    error: OSError | None = None
    for attempt in range(2):
        try:
            shutil.rmtree(root)
            return
        except RecursionError:  # rmtree recurses per level before Python 3.12
            raise WorkspaceError(f"cannot remove workspace {root}: the tree is too deep") from None
        except OSError as e:
            if not os.path.lexists(root):
                return
            error = e
        if attempt == 0:
            _unlock_dirs(root)
    assert error is not None
    where = f" ({printable(str(error.filename))})" if error.filename else ""
    raise WorkspaceError(f"cannot remove workspace {root}: {error.strerror or error}{where}; "
                         "files the container created as another user may need removing as root")


def free_disk_mb(path: Path | str) -> int:
    """Free MiB on the filesystem holding `path` (or its nearest existing parent)."""
    path = fsutil.nearest_existing(Path(path).absolute())
    try:
        return shutil.disk_usage(path).free // (1024 * 1024)
    except OSError as e:
        raise os_error(f"cannot read free disk space at {path}", e) from None


def check_free_disk(path: Path | str, min_free_mb: int, inputs_bytes: int = 0) -> int:
    """Free MiB at `path`; `DiskFull` if below `min_free_mb` (paths.min_free_disk_mb) plus what a
    task's inputs declare they need."""
    free = free_disk_mb(path)
    inputs_mb = -(-inputs_bytes // (1024 * 1024))
    if free < min_free_mb + inputs_mb:
        needs = f"the task's inputs need {inputs_mb} MiB and " if inputs_bytes else ""
        raise DiskFull(f"only {free} MiB free at {path}; {needs}paths.min_free_disk_mb asks for "
                       f"{min_free_mb} MiB")
    return free
