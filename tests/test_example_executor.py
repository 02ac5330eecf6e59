"""executor-example/: the real entrypoint.sh in a container, with a stub `pi`, offline.

The real image needs node and npm from the network, so the tests build a stand-in:
the offline python image + the host's jq (binary, libraries and loader, so it runs whatever
the image's libc) + a stub `pi` + the real entrypoint.sh, user `agent` (uid 1000) as in the
real Dockerfile. The real Dockerfile is checked for syntax: its build must fail only at
pulling the base image, which real hosts can do.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import docker
import pytest

from agent_core import config
from agent_core.protocol import InputFile, Task
from agent_core.workspace import Workspace
from tests.helpers import skip_or_fail_in_ci

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "executor-example"
CONTAINER_TIMEOUT_SECS = 60

# Stands in for the pi CLI. Behaviour: STUB_PI_MODE, else "stub-mode=<mode>" in the prompt:
#   answer (default)  print an answer that quotes the prompt
#   write-file        write output/response.md itself and print something else
#   fail              complain on stderr, exit 3
#   silent            print nothing, exit 0
#   fail-format       answer, but fail the formatting pass (the call with stdin)
# Every call is appended to output/.pi-calls.jsonl (hidden: never an output).
STUB_PI = r'''#!/usr/bin/python3
import json, os, re, sys

argv = sys.argv[1:]
prompt = argv[-1] if argv else ""
stdin = sys.stdin.read()
found = re.search(r"stub-mode=([a-z-]+)", prompt)
mode = os.environ.get("STUB_PI_MODE") or (found.group(1) if found else "answer")
config = os.environ.get("PI_CODING_AGENT_DIR") or os.path.expanduser("~/.pi/agent")
auth = os.path.join(config, "auth.json")
call = {"argv": argv, "stdin": stdin, "cwd": os.getcwd(), "uid": os.getuid(), "config_dir": config,
        "config_writable": os.access(config, os.W_OK),
        "auth": open(auth).read() if os.path.exists(auth) else None}
with open("/workspace/output/.pi-calls.jsonl", "a") as log:
    log.write(json.dumps(call) + "\n")
if mode == "fail":
    print("stub pi: 401 Unauthorized from the model provider", file=sys.stderr)
    sys.exit(3)
if mode == "silent":
    sys.exit(0)
if stdin:
    if mode == "fail-format":
        print("stub pi: formatting blew up", file=sys.stderr)
        sys.exit(4)
    print("FORMATTED:\n" + stdin.upper())
elif mode == "write-file":
    with open("/workspace/output/response.md", "w") as out:
        out.write("written by the agent\n")
    print("done, see output/response.md")
else:
    print("stub answer to:\n" + prompt)
'''

TEST_DOCKERFILE = """\
FROM {base}
COPY jq /opt/jq
COPY bin /usr/local/bin
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash agent
USER agent
WORKDIR /workspace
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
"""


# --- the test image ---------------------------------------------------------


def _host_jq() -> Path:
    """The host's jq, installed with apt when it is missing and we may."""
    found = shutil.which("jq")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "jq"]
        if subprocess.run(install, env=env, capture_output=True, stdin=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, stdin=subprocess.DEVNULL)
            subprocess.run(install, env=env, capture_output=True, stdin=subprocess.DEVNULL)
        found = shutil.which("jq")
    if found is None:
        skip_or_fail_in_ci("jq is not installed on the host (apt-get install jq), and the test image copies it")
    return Path(found).resolve()


def _shared_libraries(binary: Path) -> tuple[list[Path], Path]:
    """(libraries, loader) of a dynamically linked binary, from ldd."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs, loader = [], None
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1:]
            if target and target[0].startswith("/"):
                libs.append(Path(target[0]))
        elif parts and parts[0].startswith("/"):
            loader = Path(parts[0])
    if loader is None:
        raise AssertionError(f"no loader in `ldd {binary}`:\n{out}")
    return libs, loader


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _context(base_image: str) -> io.BytesIO:
    """The build context: Dockerfile, jq with its libraries and loader, stub pi, real entrypoint."""
    jq = _host_jq()
    libs, loader = _shared_libraries(jq)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "Dockerfile", TEST_DOCKERFILE.format(base=base_image).encode())
        _add(tar, "jq/jq", jq.read_bytes(), 0o755)
        for lib in [*libs, loader]:
            _add(tar, f"jq/lib/{lib.name}", lib.resolve().read_bytes(), 0o755)
        # Runs the host's jq with its own loader and libraries, whatever libc the image has.
        _add(tar, "bin/jq", f'#!/bin/sh\nexec /opt/jq/lib/{loader.name} --library-path /opt/jq/lib '
                            '/opt/jq/jq "$@"\n'.encode(), 0o755)
        _add(tar, "bin/pi", STUB_PI.encode(), 0o755)
        _add(tar, "bin/entrypoint.sh", (EXAMPLE / "entrypoint.sh").read_bytes(), 0o755)
    buf.seek(0)
    return buf


@pytest.fixture(scope="module")
def example_image(docker_engine: docker.DockerClient, python_image: str):
    tag = f"agent-core-test/example-executor:{uuid.uuid4().hex[:12]}"
    try:
        docker_engine.images.build(fileobj=_context(python_image), custom_context=True, tag=tag,
                                   network_mode="none", rm=True, forcerm=True, pull=False,
                                   labels={"agent-core.test-image": "example-executor"})
    except docker.errors.BuildError as e:
        log = "".join(str(entry.get("stream") or entry.get("error") or "") for entry in e.build_log)
        raise AssertionError(f"building the test image failed: {e}\n{log[-3000:]}") from None
    yield tag
    try:
        docker_engine.images.remove(tag, force=True)
    except docker.errors.APIError:
        pass  # in use by a container another session still removes: the tag is unique, nothing clashes


# --- running it -------------------------------------------------------------


def make_workspace(root: Path, prompt: object = "Summarise the notes", output_prompt: str | None = None,
                   files: dict[str, bytes] | None = None, task_json: bool = True) -> Workspace:
    """A workspace laid out by agent-core's own code, as the agent would hand it over."""
    files = {"notes.txt": b"alpha\nbeta\n", "data.csv": b"a,b\n1,2\n"} if files is None else files
    ws = Workspace.for_task(root, "task-1")
    ws.create()
    inputs, local = [], []
    for n, (name, data) in enumerate(files.items(), 1):
        rel, path = ws.input_path(n, name, count=len(files))
        path.write_bytes(data)
        local.append(rel)
        inputs.append(InputFile(id=f"f{n}", filename=name, mime_type="text/plain", size_bytes=len(data)))
    if task_json:
        ws.write_task_json(Task(id="task-1", task_prompt="placeholder", output_prompt=output_prompt,
                                input_files=tuple(inputs)), local)
        doc = json.loads(ws.task_json.read_text())
        doc["task_prompt"] = doc["prompt"] = prompt  # any value, also ones a Task cannot hold
        ws.task_json.write_text(json.dumps(doc))
    return ws


class Result:
    def __init__(self, ws: Workspace, code: int, stdout: str, stderr: str):
        self.ws, self.code, self.stdout, self.stderr = ws, code, stdout, stderr

    @property
    def response(self) -> str:
        return (self.ws.output_dir / "response.md").read_text()

    @property
    def calls(self) -> list[dict]:
        log = self.ws.output_dir / ".pi-calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    @property
    def last_error_line(self) -> str:
        return self.stderr.strip().splitlines()[-1]


@pytest.fixture
def run_example(docker_engine, docker_cleanup, example_image):
    """run_example(ws, mode=None, mounts=(), env={}) -> Result: the container as agent-core would run it."""

    def run(ws: Workspace, mode: str | None = None, mounts: tuple[docker.types.Mount, ...] = (),
            env: dict[str, str] | None = None) -> Result:
        environment = {"TASK_ID": ws.task_id, "TIMEOUT": "0", **(env or {})}
        if mode:
            environment["STUB_PI_MODE"] = mode
        container = docker_engine.containers.create(
            example_image, network_mode="none", environment=environment, labels=docker_cleanup.labels,
            mounts=[docker.types.Mount("/workspace", str(ws.root), type="bind"), *mounts])
        docker_cleanup.track(container.id)
        container.start()
        code = container.wait(timeout=CONTAINER_TIMEOUT_SECS)["StatusCode"]
        stdout = container.logs(stdout=True, stderr=False).decode(errors="replace")
        stderr = container.logs(stdout=False, stderr=True).decode(errors="replace")
        return Result(ws, code, stdout, stderr)

    return run


# --- the entrypoint -----------------------------------------------------------


def test_the_answer_lands_in_output_response_md(run_example, tmp_path):
    result = run_example(make_workspace(tmp_path))
    assert result.code == 0, result.stderr
    [call] = result.calls
    # pi runs once, non-interactively, as the image's user, in the workspace, on a prompt
    # that names the inputs and where the answer goes
    assert call["argv"][:-1] == ["--print", "--no-session"] and call["stdin"] == ""
    assert call["cwd"] == "/workspace" and call["uid"] == 1000
    prompt = call["argv"][-1]
    assert "Summarise the notes" in prompt and "/workspace/output/response.md" in prompt
    assert "- /workspace/input/01-notes.txt\n- /workspace/input/02-data.csv" in prompt
    assert not prompt.startswith("-")
    assert result.response.startswith("stub answer to:\n") and "Summarise the notes" in result.response
    assert "stub answer to:" in result.stdout  # the answer is also the task's stdout


def test_an_answer_pi_wrote_itself_is_kept(run_example, tmp_path):
    result = run_example(make_workspace(tmp_path, files={}), mode="write-file")
    assert result.code == 0, result.stderr
    assert result.response == "written by the agent\n"
    assert "There are no input files." in result.calls[0]["argv"][-1]


def test_the_output_prompt_runs_a_formatting_pass_without_tools(run_example, tmp_path):
    result = run_example(make_workspace(tmp_path, output_prompt="Shout it"))
    assert result.code == 0, result.stderr
    first, second = result.calls
    assert second["argv"][:-1] == ["--print", "--no-session", "--no-tools"]
    assert "Shout it" in second["argv"][-1]
    assert second["stdin"].startswith("stub answer to:")  # the first answer is what gets formatted
    assert result.response.startswith("FORMATTED:\nSTUB ANSWER TO:")


def test_a_failing_formatting_pass_fails_the_task_and_keeps_the_answer(run_example, tmp_path):
    result = run_example(make_workspace(tmp_path, output_prompt="Shout it"), mode="fail-format")
    assert result.code == 4
    assert "stub pi: formatting blew up" in result.stderr
    assert result.last_error_line.startswith("entrypoint: formatting with the output prompt failed")
    assert result.response.startswith("stub answer to:")


def test_a_failing_agent_fails_the_task_with_its_stderr(run_example, tmp_path):
    result = run_example(make_workspace(tmp_path, output_prompt="Shout it"), mode="fail")
    assert result.code == 3
    assert "stub pi: 401 Unauthorized" in result.stderr
    assert result.last_error_line == "entrypoint: pi failed with exit code 3"
    assert len(result.calls) == 1  # no formatting pass after a failure
    assert "pi failed with exit code 3" in result.response  # a placeholder says why


def test_an_agent_that_writes_nothing_leaves_a_placeholder(run_example, tmp_path):
    result = run_example(make_workspace(tmp_path, output_prompt="Shout it"), mode="silent")
    assert result.code == 0
    assert "without writing an answer" in result.stderr
    assert result.response.startswith("# No answer") and "pi finished without writing an answer" in result.response
    assert len(result.calls) == 1  # nothing to format


@pytest.mark.parametrize("prompt", ["", "   \n", None, 42])
def test_a_task_without_a_prompt_is_refused_before_pi_runs(run_example, tmp_path, prompt):
    result = run_example(make_workspace(tmp_path, prompt=prompt))
    assert result.code == 2
    assert result.last_error_line.startswith("entrypoint: no task prompt")
    assert result.calls == []
    assert "the task has no prompt" in result.response


def test_the_prompt_field_stands_in_for_task_prompt(run_example, tmp_path):
    ws = make_workspace(tmp_path)
    doc = json.loads(ws.task_json.read_text())
    doc.pop("task_prompt")
    doc["prompt"] = "-starts with a dash"
    ws.task_json.write_text(json.dumps(doc))
    result = run_example(ws)
    assert result.code == 0, result.stderr
    assert "-starts with a dash" in result.calls[0]["argv"][-1]


def test_a_missing_or_broken_task_json_is_a_clear_failure(run_example, tmp_path):
    missing = run_example(make_workspace(tmp_path / "a", task_json=False))
    assert missing.code == 2
    assert missing.last_error_line.startswith("entrypoint: /workspace/task.json is missing or not readable")
    broken = make_workspace(tmp_path / "b")
    broken.task_json.write_text("[1, 2]")
    result = run_example(broken)
    assert result.code == 2
    assert result.last_error_line.startswith("entrypoint: /workspace/task.json is not a JSON object")
    assert missing.calls == result.calls == []


def test_read_only_credentials_are_copied_where_pi_can_write(run_example, tmp_path):
    creds = tmp_path / "pi-agent"
    creds.mkdir()
    (creds / "auth.json").write_text('{"anthropic": {"type": "api_key", "key": "sk-test"}}')
    creds.chmod(0o755)
    (creds / "auth.json").chmod(0o644)
    mount = docker.types.Mount("/home/agent/.pi/agent", str(creds), type="bind", read_only=True)
    result = run_example(make_workspace(tmp_path), mounts=(mount,))
    assert result.code == 0, result.stderr
    [call] = result.calls
    assert call["config_dir"] != "/home/agent/.pi/agent" and call["config_writable"]
    assert json.loads(call["auth"])["anthropic"]["key"] == "sk-test"


# --- through agent-core -----------------------------------------------------------


def test_agent_core_reports_the_example_image_as_the_contract_says(make_agent, dev_client, example_image,
                                                                  tmp_path):
    agent = make_agent({"executor.image": example_image, "executor.executor_type": "standard"})
    ok = dev_client.submit_task(agent.service_id, "Count the words", files=[("words.txt", b"a b c\n")])
    bad = dev_client.submit_task(agent.service_id, "stub-mode=fail please")
    agent.start()
    ok, bad = (dev_client.wait_for_status(t["id"], ("completed", "failed", "cancelled"), timeout=120)
               for t in (ok, bad))
    assert ok["status"] == "completed", ok
    files = {f["filename"]: f for f in dev_client.list_files(ok["id"]) if f["created_by"] == "agent"}
    assert set(files) == {"output/response.md"}  # the hidden call log is never uploaded
    dest = dev_client.download_file(files["output/response.md"]["id"], tmp_path / "response.md")
    assert "Count the words" in dest.read_text() and "/workspace/input/01-words.txt" in dest.read_text()
    assert bad["status"] == "failed"
    assert bad["error_message"].startswith("exit code 3")
    assert "entrypoint: pi failed with exit code 3" in bad["error_message"]
    assert {f["filename"] for f in dev_client.list_files(bad["id"]) if f["created_by"] == "agent"} == {
        "output/response.md"}


# --- the real Dockerfile and the README -------------------------------------------


def _instructions(dockerfile: str) -> list[str]:
    """The instructions of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_real_dockerfile_parses_and_fails_only_at_pulling_the_base_image(docker_engine):
    # The engine parses the whole Dockerfile before step 1, so a syntax error would be an APIError
    # here. Offline, step 1 (FROM, which real hosts pull) is where the build must stop.
    instructions = _instructions((EXAMPLE / "Dockerfile").read_text())
    base = instructions[0].split()[1]
    assert instructions[0].startswith("FROM ") and base.startswith("node:22")
    try:
        docker_engine.images.get(base)
        skip_or_fail_in_ci(f"{base} is present locally, so the build would go on and need the network")
    except docker.errors.ImageNotFound:
        pass
    with pytest.raises(docker.errors.BuildError) as caught:
        docker_engine.images.build(path=str(EXAMPLE), network_mode="none", rm=True, forcerm=True, pull=False)
    log = [str(entry.get("stream", "")).strip() for entry in caught.value.build_log]
    assert f"Step 1/{len(instructions)} : FROM {base}" in log
    assert not any(line.startswith("Step 2/") for line in log)
    assert re.search(r"registry|pull|not found|no such host|manifest|dial tcp", str(caught.value), re.I), caught.value


def test_the_entrypoint_is_executable_bash():
    entrypoint = EXAMPLE / "entrypoint.sh"
    assert os.access(entrypoint, os.X_OK)
    subprocess.run(["bash", "-n", str(entrypoint)], check=True)


def _readme_block(language: str, after: str) -> str:
    readme = (EXAMPLE / "README.md").read_text()
    found = re.search(re.escape(after) + r".*?```" + language + r"\n(.*?)```", readme, re.S)
    assert found, f"no ```{language} block after {after!r} in executor-example/README.md"
    return found.group(1)


def test_the_readme_config_snippet_mounts_credentials_read_only(tmp_path):
    cfg = config.parse(_readme_block("toml", "Model credentials"), tmp_path / "config.toml")
    assert cfg.unknown_keys == ()
    assert cfg.executor.image == "open-aaas-executor:latest" and cfg.executor.network_mode != "none"
    [mount] = cfg.paths.mounts
    assert mount.container == "/home/agent/.pi" and mount.readonly
    # the image's user and home are the ones the snippet mounts into
    dockerfile = (EXAMPLE / "Dockerfile").read_text()
    assert "--uid 1000" in dockerfile and re.search(r"^USER agent$", dockerfile, re.M)


def test_the_readme_python_executor_works(docker_engine, docker_cleanup, python_image, tmp_path):
    run_py = tmp_path / "run.py"
    run_py.write_text(_readme_block("python", "run.py"))
    assert _readme_block("dockerfile", "Dockerfile").startswith("FROM python")
    ws = make_workspace(tmp_path / "data")
    container = docker_engine.containers.create(
        python_image, ["python3", "/opt/run.py"], network_mode="none", user="65534:65534",
        working_dir="/workspace", environment={"TASK_ID": ws.task_id, "TIMEOUT": "0"},
        labels=docker_cleanup.labels,
        mounts=[docker.types.Mount("/workspace", str(ws.root), type="bind"),
                docker.types.Mount("/opt/run.py", str(run_py), type="bind", read_only=True)])
    docker_cleanup.track(container.id)
    container.start()
    assert container.wait(timeout=CONTAINER_TIMEOUT_SECS)["StatusCode"] == 0, container.logs().decode()
    outputs = sorted(p.name for p in ws.output_dir.iterdir())
    assert outputs, "the README example wrote nothing to output/"
    text = "".join(p.read_text() for p in ws.output_dir.iterdir())
    assert "Summarise the notes" in text and "notes.txt" in text
