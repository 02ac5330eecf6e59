"""A Docker engine of a test's own: a private `dockerd` that the test can stop and start again
while the system engine (and every other test on it) goes on.

It never collides with the system engine at /var/run/docker.sock: its own socket, data root,
exec root (so its own managed containerd), pidfile and config file (not /etc/docker/daemon.json),
a bridge interface of its own, and no iptables or masquerading. Not `--bridge=none`: a dockerd
without a bridge deletes the host's docker0, which the system engine's bridged containers need (the
private one shares the host's network namespace). Optionally it also listens on tcp://127.0.0.1:<port>
with --tlsverify and certificates made here with openssl. Root only.

    make_private_engine  function  factory: make_private_engine(live_restore=False, tls=False)
                                   -> a started PrivateEngine with the busybox test image loaded;
                                   each one is torn down (containers, mounts, processes, files)
    PrivateEngine        .url, .client(), .stop(), .start(), .log(), .close(); with tls=True also
                         .tcp_url, .tls_client(), .tls_env() (DOCKER_HOST/DOCKER_TLS_VERIFY/DOCKER_CERT_PATH)

Use it from a test module with `from tests.private_engine import make_private_engine`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import docker
import psutil
import pytest

from tests.docker_fixtures import BUSYBOX_IMAGE
from tests.helpers import skip_or_fail_in_ci
from tests.test_metrics import free_port

__all__ = ["STORAGE_DRIVERS", "EngineTLS", "PrivateEngine", "PrivateEngineError", "make_private_engine"]

# The system engine runs fuse-overlayfs; on this host's ext4 all three work, overlay2 fastest.
STORAGE_DRIVERS = ("overlay2", "fuse-overlayfs", "vfs")
START_TIMEOUT_SECS = 60.0
STOP_TIMEOUT_SECS = 60.0  # a non-live-restore stop waits up to 10 s per container it stops
_chosen_driver: str | None = None  # the first driver that started here, for the rest of the session


class PrivateEngineError(RuntimeError):
    """The private engine cannot be started, reached or stopped; the message ends with its log's tail."""


@dataclass(frozen=True)
class EngineTLS:
    """Certificates for the tcp listener: the server's, and a client's in Docker's layout
    (`client_dir` holds ca.pem, cert.pem and key.pem: what DOCKER_CERT_PATH points at)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_dir: Path

    @property
    def client_cert(self) -> tuple[str, str]:
        return str(self.client_dir / "cert.pem"), str(self.client_dir / "key.pem")

    @classmethod
    def make(cls, folder: Path) -> EngineTLS:
        """A throwaway CA, a server certificate for IP 127.0.0.1 and a client certificate."""
        folder.mkdir(parents=True)
        client = folder / "client"
        client.mkdir()
        ca, ca_key = folder / "ca.pem", folder / "ca-key.pem"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=agent-core test CA")
        tls = cls(ca=ca, server_cert=folder / "server-cert.pem", server_key=folder / "server-key.pem",
                  client_dir=client)
        _sign(folder, ca, ca_key, "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
              tls.server_cert, tls.server_key)
        _sign(folder, ca, ca_key, "agent-core test client", "extendedKeyUsage=clientAuth\n",
              client / "cert.pem", client / "key.pem")
        shutil.copy(ca, client / "ca.pem")
        return tls


def _openssl(*args: str | Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise PrivateEngineError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _sign(folder: Path, ca: Path, ca_key: Path, subject: str, extensions: str, cert: Path, key: Path) -> None:
    csr, ext = folder / f"{cert.stem}.csr", folder / f"{cert.stem}.ext"
    ext.write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
             "-out", csr, "-subj", f"/CN={subject}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", ext)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise PrivateEngineError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _answers_ping(path: Path) -> bool:
    """Whether an engine answers GET /_ping on the unix socket `path`. Raw, because a docker-py
    client made while the engine is not up yet leaks its socket (its version probe fails)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: engine\r\n\r\n")
            return s.recv(64).startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
    except OSError:
        return False


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (the order to unmount them)."""
    prefix = str(root)
    with open("/proc/self/mountinfo") as info:
        points = [line.split()[4] for line in info]
    mine = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    return sorted(set(mine), key=len, reverse=True)


class PrivateEngine:
    """One private dockerd under `root` (keep it short: the containerd socket under the exec root
    must fit a unix socket path, 108 bytes). `stop` and `start` keep every path, so a restart
    finds its containers (and, with live_restore, re-attaches to the running ones)."""

    def __init__(self, root: Path, live_restore: bool = False, tls: bool = False):
        self.root = root
        self.live_restore = live_restore
        self.socket = root / "docker.sock"
        self.data_root, self.exec_root = root / "data", root / "x"
        self.pidfile, self.log_path = root / "dockerd.pid", root / "dockerd.log"
        self.config_file = root / "daemon.json"
        self.config_file.write_text(json.dumps({}))  # not /etc/docker/daemon.json: it names the system's paths
        self.tls = EngineTLS.make(root / "certs") if tls else None
        self.port = free_port() if tls else None
        self.bridge = f"pe{root.name[-8:].lower()}"  # its own, ≤ 15 characters: an interface name
        self.driver: str | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_url(self) -> str | None:
        return f"tcp://127.0.0.1:{self.port}" if self.port else None

    def tls_env(self) -> dict[str, str]:
        """The environment that points the docker CLI (or docker-py, unless REQUESTS_CA_BUNDLE is set:
        see tls_client) at the TLS listener."""
        assert self.tls is not None and self.tcp_url, "made without tls=True"
        return {"DOCKER_HOST": self.tcp_url, "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(self.tls.client_dir)}

    def client(self, timeout: float = 30) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=timeout)

    def tls_client(self, client_cert: bool = True, timeout: float = 30) -> docker.DockerClient:
        """A client on the TLS listener that checks the server; `client_cert=False` presents none."""
        assert self.tls is not None, "made without tls=True"
        tls = docker.tls.TLSConfig(ca_cert=str(self.tls.ca), verify=True,
                                   client_cert=self.tls.client_cert if client_cert else None)
        with closing(self.client()) as local:
            version = local.version()["ApiVersion"]  # "auto" would ask over TLS before trust_env is off
        client = docker.DockerClient(base_url=self.tcp_url, tls=tls, timeout=timeout, version=version)
        # requests lets REQUESTS_CA_BUNDLE (set on this host) replace the session's CA: psf/requests#3829
        client.api.trust_env = False
        return client

    # --- the process --------------------------------------------------------------

    def _command(self, driver: str) -> list[str]:
        cmd = ["dockerd", "--host", self.url, "--data-root", str(self.data_root),
               "--exec-root", str(self.exec_root), "--pidfile", str(self.pidfile),
               "--config-file", str(self.config_file), "--storage-driver", driver,
               "--bridge", self.bridge, "--iptables=false", "--ip-masq=false"]
        if self.live_restore:
            cmd.append("--live-restore")
        if self.tls is not None:
            cmd += ["--host", str(self.tcp_url), "--tlsverify", "--tlscacert", str(self.tls.ca),
                    "--tlscert", str(self.tls.server_cert), "--tlskey", str(self.tls.server_key)]
        return cmd

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT_SECS) -> PrivateEngine:
        """Start dockerd and wait until it answers. The first start picks the storage driver
        (the session's earlier choice first); later starts keep the one chosen."""
        global _chosen_driver
        if self.running():
            return self
        if self.driver is not None:
            self._launch(self.driver, timeout)
            return self
        candidates = ([_chosen_driver] if _chosen_driver else []) + [d for d in STORAGE_DRIVERS if d != _chosen_driver]
        failures = []
        for driver in candidates:
            try:
                self._launch(driver, timeout)
            except PrivateEngineError as e:
                failures.append(f"{driver}: {e}")
                continue
            self.driver = _chosen_driver = driver
            return self
        raise PrivateEngineError("no storage driver starts a private dockerd here:\n" + "\n".join(failures))

    def _launch(self, driver: str, timeout: float) -> None:
        if subprocess.run(["ip", "link", "show", self.bridge], capture_output=True).returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")  # dockerd wants a named bridge to exist
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting with {driver}\n".encode())
            log.flush()
            # its own session: a ^C to pytest must not reach it before the teardown does
            self._proc = subprocess.Popen(self._command(driver), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise PrivateEngineError(f"dockerd exited with code {self._proc.returncode}{self._log_tail()}")
            if _answers_ping(self.socket):  # dockerd refuses at startup a driver that cannot work here
                return
            if time.monotonic() > deadline:
                self._terminate()
                raise PrivateEngineError(f"dockerd did not answer within {timeout:.0f} s{self._log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT_SECS) -> None:
        """SIGTERM and wait: the engine's own shutdown (without live-restore it stops the containers)."""
        if self.running():
            self._terminate(timeout)

    def _terminate(self, timeout: float = STOP_TIMEOUT_SECS) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise PrivateEngineError(f"dockerd ignored SIGTERM for {timeout:.0f} s{self._log_tail()}") from None

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return ""
        return "\n  dockerd log: " + "\n  ".join(tail)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- content and teardown -----------------------------------------------------

    def load_image(self, source: docker.DockerClient, name: str = BUSYBOX_IMAGE) -> None:
        """Copy `name` from `source` (the system engine), streamed: save's chunks go straight to load."""
        with closing(self.client(timeout=300)) as client:
            client.images.load(source.images.get(name).save(named=name))  # by id it would load untagged
            client.images.get(name)  # NotFound here if the load took nothing

    def remove_containers(self) -> list[str]:
        """Force-remove every container; returns the errors."""
        errors = []
        with closing(self.client(timeout=60)) as client:
            for found in client.api.containers(all=True):
                try:
                    client.api.remove_container(found["Id"], force=True, v=True)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as e:
                    errors.append(f"{found['Id'][:12]}: {e}")
        return errors

    def _leftover_processes(self) -> list[psutil.Process]:
        """Processes that belong to this engine alone: they name its root on their command line
        (its containerd, and containerd shims that outlived it), and everything below them."""
        mine, inside = [], f"{self.root}/"
        for proc in psutil.process_iter(["cmdline"]):
            if any(inside in arg for arg in proc.info["cmdline"] or ()):
                mine.append(proc)
                try:
                    mine += proc.children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
        return mine

    def close(self) -> list[str]:
        """Tear everything down: containers, dockerd, leftover processes, mounts, files.
        Returns what could not be cleaned (the fixture fails the test with it)."""
        problems: list[str] = []
        try:
            if self.driver is not None:  # it ran: start it again if stopped, the clean way to remove its containers
                self.start()
                problems += self.remove_containers()
            self.stop()
        except (PrivateEngineError, docker.errors.DockerException) as e:
            problems.append(f"cannot shut down cleanly: {e}")
            if self.running():
                self._proc.kill()
                self._proc.wait()
        for proc in self._leftover_processes():
            try:
                what = " ".join(proc.cmdline())[:120]
                proc.kill()
            except psutil.NoSuchProcess:
                continue
            problems.append(f"killed leftover pid {proc.pid}: {what}")
        for point in _mounts_under(self.root):  # dockerd bind-mounts its data root onto itself
            subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)
        if subprocess.run(["ip", "link", "show", self.bridge], capture_output=True).returncode == 0:
            try:
                _ip("link", "delete", self.bridge)
            except PrivateEngineError as e:
                problems.append(str(e))
        left = _mounts_under(self.root)
        if left:
            problems.append(f"still mounted: {left}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        return problems


@pytest.fixture
def make_private_engine(docker_engine) -> Iterator[Callable[..., PrivateEngine]]:
    """make_private_engine(live_restore=False, tls=False) -> a started private engine with the
    busybox test image. Skips off root or without dockerd; with CI=true those are failures."""
    engines: list[PrivateEngine] = []

    def make(live_restore: bool = False, tls: bool = False) -> PrivateEngine:
        if os.geteuid() != 0:
            skip_or_fail_in_ci("a private dockerd needs root")
        if shutil.which("dockerd") is None:
            skip_or_fail_in_ci("a private engine needs dockerd on PATH")
        # a short root under /tmp, not tmp_path: the exec root holds unix sockets
        engine = PrivateEngine(Path(tempfile.mkdtemp(prefix="pe-", dir="/tmp")), live_restore=live_restore, tls=tls)
        engines.append(engine)
        try:
            engine.start()
            engine.load_image(docker_engine)
        except (PrivateEngineError, docker.errors.DockerException) as e:
            skip_or_fail_in_ci(f"cannot run a private dockerd: {e}")
        return engine

    yield make
    problems = [f"{e.root}: {p}" for e in engines for p in e.close()]
    if problems:
        pytest.fail("private engine teardown: " + "; ".join(problems), pytrace=False)
