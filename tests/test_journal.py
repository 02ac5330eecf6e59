"""The task journal (durable records, replay), without Docker.

The shutdown ladder's tests are in tests/test_scheduler.py.
"""

from __future__ import annotations

import json
import os

import pytest

from agent_core import fsutil
from agent_core.errors import JournalError
from agent_core.journal import Journal, Stage, TaskRecord
from agent_core.protocol import Completion, InputFile, Task
from agent_core.outcome import CancelReason


def record(task_id: str = "t-1", **changes) -> TaskRecord:
    task = Task(id=task_id, task_prompt="p", output_prompt=None, session_id=None,
                input_files=(InputFile(id="f1", filename="../a b.txt", mime_type=None, size_bytes=3),))
    return TaskRecord(task=task, **changes)


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


# --- records ------------------------------------------------------------------------


def test_a_record_at_every_stage_round_trips(tmp_path):
    journal = Journal(tmp_path)
    rec = record(container_id="c" * 64, launched_at=12.5, exit_code=3, oom_killed=True,
                 cancel_reason=CancelReason.TIMEOUT.value, error=None, uploads={"output/a": "fid-1"},
                 completion=Completion(task_id="t-1", status="failed", output={"files": ["output/a"]},
                                       error_message="exit code 3", file_ids=("fid-1",)))
    journal.add_upload("t-1", "output/a", "fid-1")
    for stage in Stage:
        rec.stage = stage
        journal.save(rec)
        (back,) = Journal(tmp_path).replay()
        assert back == rec
    assert oct(os.stat(journal.dir / "t-1.json").st_mode & 0o777) == "0o600"
    assert oct(os.stat(journal.dir).st_mode & 0o777) == "0o700"
    journal.remove("t-1")
    journal.remove("t-1")  # already gone: fine
    assert journal.replay() == []


def test_a_failed_write_keeps_the_previous_record_whole(tmp_path, monkeypatch):
    journal = Journal(tmp_path)
    journal.save(record(stage=Stage.STAGED))

    def crash(*_args):
        raise OSError(28, "No space left on device")

    # the crash comes after the new text was written to the temporary file, before the rename
    monkeypatch.setattr(fsutil.os, "replace", crash)
    with pytest.raises(JournalError, match="No space left"):
        journal.save(record(stage=Stage.LAUNCHED, container_id="abc"))
    monkeypatch.undo()
    (back,) = journal.replay()
    assert back.stage is Stage.STAGED and back.container_id is None
    assert files(journal.dir) == ["t-1.json"]  # no temporary file left


def test_torn_and_corrupt_records_are_set_aside_and_the_rest_replays(tmp_path, caplog):
    journal = Journal(tmp_path)
    journal.save(record("good"))
    text = (journal.dir / "good.json").read_text()
    bad = {
        "torn.json": text[: len(text) // 2],  # a write cut short (no atomic rename)
        "binary.json": "\xff\xfe{",  # not UTF-8
        "stage.json": text.replace('"ACCEPTED"', '"NO_SUCH_STAGE"'),
        "wrong-name.json": text,  # holds task "good": a copy must not run it twice
        "list.json": "[1, 2]",
        "when.json": json.dumps({**json.loads(text), "accepted_at": "yesterday"}),
        "uploads.json": json.dumps({**json.loads(text), "uploads": ["output/a"]}),
        "nested.json": json.dumps({**json.loads(text), "task": {"id": "../../etc/x"}}),
    }
    for name, content in bad.items():
        (journal.dir / name).write_text(content, encoding="latin-1")
    (journal.dir / ".good.json.abc123.tmp").write_text("half")  # a crash inside write_atomic
    assert [r.task_id for r in journal.replay()] == ["good"]
    assert sorted(p.name for p in journal.corrupt_dir.iterdir()) == sorted(bad)
    assert files(journal.dir) == ["good.json"] and journal.corrupt_dir.is_dir()
    assert "torn.json is unreadable" in caplog.text
    assert journal.replay()[0].task_id == "good"  # set aside once, not again


def test_the_task_is_written_once_and_uploads_are_appended(tmp_path, monkeypatch):
    # Given a task with a big prompt, journaled at every stage and after each of 50 uploads
    written: list[str] = []
    real = fsutil.write_atomic

    def counting(path, text, *args, **kwargs):
        written.append(len(text))
        return real(path, text, *args, **kwargs)

    monkeypatch.setattr("agent_core.journal.write_atomic", counting)
    journal = Journal(tmp_path)
    rec = TaskRecord(task=Task(id="big", task_prompt="p" * 1_000_000))
    for stage in Stage:
        rec.stage = stage
        journal.save(rec)
    for n in range(50):
        rec.uploads[f"output/{n}"] = f"fid-{n}"
        journal.add_upload("big", f"output/{n}", f"fid-{n}")
    # Then the prompt was written once; every other write is small
    assert sum(written) < 1_000_000 + 20_000 and max(sorted(written)[:-1]) < 2000
    # and a restart gets everything back, even with a torn last line in the upload log
    with open(journal.uploads_dir / "big.log", "a") as f:
        f.write('{"path": "output/torn", "file')
    (back,) = Journal(tmp_path).replay()
    assert back.task.task_prompt == rec.task.task_prompt and back.uploads == rec.uploads
    # and removing the task removes all three files
    journal.remove("big")
    assert [p for p in journal.dir.rglob("*") if p.is_file()] == []


def test_a_record_from_before_the_split_still_replays(tmp_path):
    journal = Journal(tmp_path)
    journal.dir.mkdir(parents=True)
    legacy = {"task": record().task.to_json(), "stage": "UPLOADED", "accepted_at": 5.0,
              "uploads": {"output/a": "fid-1"}, "container_id": None, "completion": None}
    (journal.dir / "t-1.json").write_text(json.dumps(legacy))
    (back,) = journal.replay()
    assert back.stage is Stage.UPLOADED and back.uploads == {"output/a": "fid-1"} and back.task == record().task


def test_leftover_task_and_upload_files_without_a_record_are_removed(tmp_path):
    journal = Journal(tmp_path)
    journal.save(record("gone"))
    journal.add_upload("gone", "output/a", "f")
    (journal.dir / "gone.json").unlink()  # a crash inside remove(): the record went first
    assert journal.replay() == []
    assert [p for p in journal.dir.rglob("*") if p.is_file()] == []


def test_replay_is_oldest_first_whatever_the_names(tmp_path):
    journal = Journal(tmp_path)
    for name, when in (("b", 30.0), ("a", 20.0), ("c", 10.0), ("d", 40.0)):
        journal.save(record(name, accepted_at=when))
    assert [r.task_id for r in journal.replay()] == ["c", "a", "b", "d"]


@pytest.mark.parametrize("task_id", ["", "..", ".hidden", "a/b", "../../etc/passwd", "a\\b", "nul\0x"])
def test_a_record_is_never_written_or_removed_outside_the_journal(tmp_path, task_id):
    journal = Journal(tmp_path / "data")
    with pytest.raises(JournalError):
        journal.save(record(task_id))
    with pytest.raises(JournalError):
        journal.remove(task_id)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
