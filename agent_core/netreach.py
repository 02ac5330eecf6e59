"""What a task container's network reaches on this host: the cloud metadata service and host services.

On Docker's default `bridge` network a task (root inside) can connect to 169.254.169.254 (NAT through
the host's default route) and to every host socket bound to a wildcard address or to any non-loopback
address of the host, `enable_host_access = false` or not. This module says so, for `doctor` and the
daemon's start-up log, without sending a packet: it reads the engine's description of the network,
the host's routing table (/proc/net/route) and the host's listening sockets (psutil).

`decide()` is pure (engine attrs as a dict, the route table as text, listeners as values);
`assess()` gathers those three and calls it.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import psutil

from agent_core.config import parse_listen

METADATA = "169.254.169.254"
ROUTE_TABLE = Path("/proc/net/route")
MAX_ROUTE_TABLE_BYTES = 1 << 20  # a host with a full BGP table is not a task node; cap what we read
MAX_LISTED = 8  # services named on the one doctor line; the rest are counted
MAX_PROCESS_NAME = 32

_RTF_UP, _RTF_REJECT = 0x0001, 0x0200  # linux/route.h
_WILDCARDS = ("0.0.0.0", "::")
_OPT = "com.docker.network.bridge."

FIX = ('to cut tasks off: network_mode = "none"; or a network of their own with no way out '
       '(`docker network create --internal -o com.docker.network.bridge.inhibit_ipv4=true NAME`, then '
       'network_mode = "NAME"); or host firewall rules: `iptables -I DOCKER-USER -s {subnet} -d '
       f'{METADATA} -j DROP` and `iptables -I INPUT -i {{iface}} -j DROP` (the host\'s own ports)')


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket of the host."""
    address: str
    port: int
    process: str | None = None

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}" + (f" ({self.process})" if self.process else "")


def _sorted(listeners: Iterable[Listener]) -> tuple[Listener, ...]:
    return tuple(sorted(set(listeners), key=lambda ln: (ln.address, ln.port, ln.process or "")))


@dataclass(frozen=True)
class Network:
    """The parts of the engine's network description that decide what a task reaches."""
    name: str
    driver: str
    internal: bool
    masquerade: bool
    host_side_address: bool  # the bridge carries a host address (the gateway) tasks can connect to
    gateways: tuple[str, ...]
    subnets: tuple[str, ...]
    interface: str


@dataclass(frozen=True)
class Reach:
    """The verdict. `metadata`/`services` are None when they could not be assessed."""
    level: str  # "ok" or "warn"
    message: str
    metadata: bool | None
    services: tuple[Listener, ...] | None


# --- pure -------------------------------------------------------------------


def network_from_attrs(name: str, attrs: Mapping[str, Any]) -> Network:
    """Read docker-py's `networks.get(name).attrs` (the engine's JSON) defensively."""
    options = attrs.get("Options") if isinstance(attrs.get("Options"), Mapping) else {}
    ipam = attrs.get("IPAM") if isinstance(attrs.get("IPAM"), Mapping) else {}
    configs = [c for c in (ipam.get("Config") or []) if isinstance(c, Mapping)]
    net_id = str(attrs.get("Id") or "")
    return Network(
        name=name,
        driver=str(attrs.get("Driver") or ""),
        internal=attrs.get("Internal") is True,
        masquerade=str(options.get(f"{_OPT}enable_ip_masquerade", "true")).lower() != "false",
        host_side_address=str(options.get(f"{_OPT}inhibit_ipv4", "false")).lower() != "true",
        gateways=tuple(str(c["Gateway"]) for c in configs if c.get("Gateway")),
        subnets=tuple(str(c["Subnet"]) for c in configs if c.get("Subnet")),
        interface=str(options.get(f"{_OPT}name") or f"br-{net_id[:12]}"),
    )


def has_route(route_table: str, address: str = METADATA) -> bool:
    """Does the host route IPv4 `address` somewhere (a default route counts)? Longest prefix wins."""
    target = int(ipaddress.IPv4Address(address))
    best: tuple[int, int] | None = None  # (prefix length, flags)
    for row in route_table.splitlines()[1:]:
        fields = row.split()
        if len(fields) < 8:
            continue
        try:
            dest, flags, mask = (_route_int(fields[1]), int(fields[3], 16), _route_int(fields[7]))
        except ValueError:
            continue
        if flags & _RTF_UP and target & mask == dest & mask:
            prefix = bin(mask).count("1")
            if best is None or prefix > best[0]:
                best = (prefix, flags)
    return best is not None and not best[1] & _RTF_REJECT


def _route_int(field: str) -> int:
    # /proc/net/route prints each address as the kernel's u32 in host byte order.
    return int.from_bytes(int(field, 16).to_bytes(4, sys.byteorder), "big")


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def reachable_services(network: Network, listeners: Iterable[Listener]) -> tuple[Listener, ...]:
    """The host's listeners a task on this bridge network can connect to.

    Never a loopback one. On an internal network (no route out of its subnet) a wildcard one or
    one on the network's gateway, and none at all when the bridge carries no host address; on any
    other, every one: the task's default route is the host, which delivers to all its addresses.
    """
    def reachable(ln: Listener) -> bool:
        if is_loopback(ln.address):
            return False
        if not network.internal:
            return True
        return network.host_side_address and (ln.address in _WILDCARDS or ln.address in network.gateways)
    return _sorted(ln for ln in listeners if reachable(ln))


def decide(mode: str, attrs: Mapping[str, Any] | None, route_table: str | None,
           listeners: Iterable[Listener] | None) -> Reach:
    """What a task on `executor.network_mode` reaches; `attrs` is None when the engine has no such network."""
    if mode == "none":
        return Reach("ok", f"network none: tasks reach nothing ({METADATA} and host services not reachable)",
                     False, ())
    routed = None if route_table is None else has_route(route_table)
    listed = None if listeners is None else _sorted(listeners)
    if mode == "host":
        return Reach("warn", f"network host: tasks share the host's network, loopback included: "
                             f"{_metadata_words(routed)}; host services reachable: {_services_words(listed)}; "
                             f"to cut tasks off: a bridge network or network_mode = \"none\"", routed, listed)
    if mode.startswith("container:"):
        return Reach("warn", f"network {mode}: tasks inherit that container's network and reach what it "
                             f"reaches; check that container's network_mode instead", None, None)
    if attrs is None:
        return Reach("warn", f"network {mode} not found on the engine: tasks cannot start on it (so "
                             f"{METADATA} and host services not reachable); create it or fix "
                             f"executor.network_mode", False, ())
    net = network_from_attrs(mode, attrs)
    if net.driver != "bridge":
        return Reach("warn", f"network {mode} (driver {net.driver or '?'}): what tasks reach is not assessed "
                             f"(only bridge networks are)", None, None)
    metadata = None if routed is None else (routed and net.masquerade and not net.internal)
    services = None if listed is None else reachable_services(net, listed)
    exposed = metadata is not False or services is None or bool(services)
    message = (f"network {mode}: {_metadata_words(metadata, net)}; "
               f"host services reachable: {_services_words(services)}")
    if exposed:
        subnet = next((s for s in net.subnets if ":" not in s), "<subnet>")
        message += "; " + FIX.format(subnet=subnet, iface=net.interface)
    return Reach("warn" if exposed else "ok", message, metadata, services)


def _metadata_words(reachable: bool | None, net: Network | None = None) -> str:
    if reachable is None:
        return f"{METADATA} unknown (no {ROUTE_TABLE} to read)"
    if reachable:
        return f"{METADATA} (cloud metadata) reachable: the host routes it"
    why = ("internal network" if net.internal else "no masquerading" if not net.masquerade
           else "the host has no route to it") if net else "the host has no route to it"
    return f"{METADATA} not reachable ({why})"


def _services_words(services: tuple[Listener, ...] | None) -> str:
    if services is None:
        return "unknown (cannot list the host's sockets)"
    if not services:
        return "none"
    more = len(services) - MAX_LISTED
    return ", ".join(map(str, services[:MAX_LISTED])) + (f" and {more} more" if more > 0 else "")


def metrics_exposure_warning(listen: str) -> str | None:
    """A warning line when `metrics.listen` is not loopback-only, else None."""
    if not listen:
        return None
    try:
        host, port = parse_listen(listen)
    except ValueError:
        host, port = listen, 0
    if is_loopback(host):
        return None
    return (f"metrics.listen = {listen!r} is not a loopback address: task containers on bridge networks can "
            f"reach /metrics and /healthz there (served without credentials); set it to 127.0.0.1:{port}, or "
            f"drop the port for the bridge interfaces in the host firewall "
            f"(`iptables -I INPUT -i docker0 -p tcp --dport {port} -j DROP`)")


# --- edges ------------------------------------------------------------------


def read_route_table(path: Path = ROUTE_TABLE) -> str | None:
    """The host's IPv4 route table as text; None where there is none (not Linux)."""
    try:
        with path.open("rb") as f:
            return f.read(MAX_ROUTE_TABLE_BYTES).decode("ascii", "replace")
    except OSError:
        return None


def host_listeners() -> tuple[Listener, ...] | None:
    """The host's listening TCP sockets with their process names when psutil can tell; None if not allowed."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None  # macOS wants root for this
    found = {}
    for c in conns:
        if c.status != psutil.CONN_LISTEN or not c.laddr:
            continue
        key = (str(c.laddr.ip), int(c.laddr.port))
        if found.get(key) is None:
            found[key] = _process_name(c.pid)
    return _sorted(Listener(ip, port, name) for (ip, port), name in found.items())


def _process_name(pid: int | None) -> str | None:
    if not pid:
        return None
    try:
        name = psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None
    # a host-network container names its own processes: keep the doctor line one printable line
    return "".join(ch for ch in name if ch.isprintable())[:MAX_PROCESS_NAME] or None


def assess(mode: str, inspect: Callable[[str], Mapping[str, Any] | None]) -> Reach:
    """decide() for this host; `inspect(name)` is the engine's network description, None when missing."""
    name = "bridge" if mode == "default" else mode
    needs_engine = name not in ("none", "host") and not name.startswith("container:")
    return decide(name, inspect(name) if needs_engine else None,
                  None if name == "none" else read_route_table(),
                  None if name == "none" else host_listeners())
