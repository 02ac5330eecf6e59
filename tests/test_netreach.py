"""netreach: what a task's network reaches, decided from engine attrs, a route table and listeners.

No packet is sent anywhere: the only sockets here listen, on 0.0.0.0 and 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import sys

import psutil
import pytest

from agent_core import netreach
from agent_core.netreach import Listener

HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def route(iface: str, dest: str, mask: str, flags: int = 0x1, gateway: str = "0.0.0.0") -> str:
    """One /proc/net/route row; addresses in the kernel's host byte order, as the file prints them."""
    def hexed(addr: str) -> str:
        return f"{int.from_bytes(socket.inet_aton(addr), sys.byteorder):08X}"
    return f"{iface}\t{hexed(dest)}\t{hexed(gateway)}\t{flags:04X}\t0\t0\t0\t{hexed(mask)}\t0\t0\t0\n"


DEFAULT_ROUTE = HEADER + route("eth0", "0.0.0.0", "0.0.0.0", 0x3, "192.0.2.1") + \
    route("docker0", "172.17.0.0", "255.255.0.0") + route("eth0", "192.0.2.0", "255.255.255.0")
LOCAL_ONLY = HEADER + route("docker0", "172.17.0.0", "255.255.0.0") + route("eth0", "192.0.2.0", "255.255.255.0")

DEFAULT_BRIDGE = {  # `docker network inspect bridge` on a stock engine (Gateway is often absent)
    "Name": "bridge", "Id": "e6da010152410565", "Driver": "bridge", "Internal": False,
    "IPAM": {"Driver": "default", "Options": None, "Config": [{"Subnet": "172.17.0.0/16"}]},
    "Options": {"com.docker.network.bridge.default_bridge": "true",
                "com.docker.network.bridge.enable_ip_masquerade": "true",
                "com.docker.network.bridge.host_binding_ipv4": "0.0.0.0",
                "com.docker.network.bridge.name": "docker0"},
}


def user_network(internal: bool = False, **options: str) -> dict:
    return {"Name": "tasks", "Id": "0123456789abcdef0123", "Driver": "bridge", "Internal": internal,
            "IPAM": {"Config": [{"Subnet": "172.30.0.0/16", "Gateway": "172.30.0.1"}]},
            "Options": {f"com.docker.network.bridge.{k}": v for k, v in options.items()}}


SSH = Listener("0.0.0.0", 22, "sshd")
SSH6 = Listener("::", 22, "sshd")
DNS_LOCAL = Listener("127.0.0.53", 53, "systemd-resolved")
DB_LOCAL6 = Listener("::1", 5432, "postgres")
ON_GATEWAY = Listener("172.30.0.1", 8080, "api")
ON_ETH0 = Listener("192.0.2.5", 9100, "node_exporter")
LISTENERS = (SSH, SSH6, DNS_LOCAL, DB_LOCAL6, ON_GATEWAY, ON_ETH0)


# --- routes --------------------------------------------------------------------


@pytest.mark.parametrize("table, routed", [
    (DEFAULT_ROUTE, True),
    (LOCAL_ONLY, False),
    (HEADER, False),
    ("", False),
    (LOCAL_ONLY + route("eth0", "169.254.169.254", "255.255.255.255"), True),  # a host route of its own
    (DEFAULT_ROUTE + route("lo", "169.254.0.0", "255.255.0.0", 0x201), False),  # a reject route wins
    (LOCAL_ONLY + route("eth0", "0.0.0.0", "0.0.0.0", 0x2), False),  # a default route that is down
    (HEADER + "garbage\nmore garbage with eight fields x y z w\n" + DEFAULT_ROUTE.split("\n", 1)[1], True),
])
def test_route_to_metadata(table, routed):
    assert netreach.has_route(table) is routed


def test_the_hosts_own_table_parses():
    table = netreach.read_route_table()
    if table is None:
        pytest.skip("no /proc/net/route here")
    assert netreach.has_route(table) in (True, False)
    assert netreach.read_route_table(netreach.Path("/nonexistent/route")) is None


# --- engine attrs --------------------------------------------------------------


def test_default_bridge_attrs():
    net = netreach.network_from_attrs("bridge", DEFAULT_BRIDGE)
    assert (net.driver, net.internal, net.masquerade, net.host_side_address) == ("bridge", False, True, True)
    assert (net.subnets, net.gateways, net.interface) == (("172.17.0.0/16",), (), "docker0")


def test_user_network_attrs_and_hostile_shapes():
    net = netreach.network_from_attrs("tasks", user_network(True, enable_ip_masquerade="false", inhibit_ipv4="true"))
    assert (net.internal, net.masquerade, net.host_side_address) == (True, False, False)
    assert (net.gateways, net.interface) == (("172.30.0.1",), "br-0123456789ab")
    odd = netreach.network_from_attrs("x", {"Driver": None, "IPAM": {"Config": ["junk", None]}, "Options": []})
    assert (odd.driver, odd.subnets, odd.masquerade) == ("", (), True)


# --- decisions -----------------------------------------------------------------


def test_default_bridge_reaches_metadata_and_every_non_loopback_service():
    reach = netreach.decide("bridge", DEFAULT_BRIDGE, DEFAULT_ROUTE, LISTENERS)
    assert reach.level == "warn" and reach.metadata is True
    assert reach.services == netreach._sorted((SSH, SSH6, ON_GATEWAY, ON_ETH0))
    assert "169.254.169.254 (cloud metadata) reachable" in reach.message
    assert "0.0.0.0:22 (sshd)" in reach.message and "[::]:22 (sshd)" in reach.message
    assert "127.0.0.53" not in reach.message and "[::1]" not in reach.message
    # the fix names this network's subnet and bridge interface
    assert "iptables -I DOCKER-USER -s 172.17.0.0/16 -d 169.254.169.254 -j DROP" in reach.message
    assert "iptables -I INPUT -i docker0 -j DROP" in reach.message
    assert 'network_mode = "none"' in reach.message and "--internal" in reach.message


def test_internal_network_reaches_only_wildcard_and_gateway_services():
    reach = netreach.decide("tasks", user_network(internal=True), DEFAULT_ROUTE, LISTENERS)
    assert reach.metadata is False and "not reachable (internal network)" in reach.message
    assert reach.services == netreach._sorted((SSH, SSH6, ON_GATEWAY))
    assert reach.level == "warn" and "br-0123456789ab" in reach.message


def test_internal_network_without_a_host_address_reaches_nothing():
    reach = netreach.decide("tasks", user_network(True, inhibit_ipv4="true"), DEFAULT_ROUTE, LISTENERS)
    assert (reach.level, reach.metadata, reach.services) == ("ok", False, ())
    assert "host services reachable: none" in reach.message and "to cut tasks off" not in reach.message


@pytest.mark.parametrize("attrs, table, why", [
    (user_network(enable_ip_masquerade="false"), DEFAULT_ROUTE, "no masquerading"),
    (user_network(), LOCAL_ONLY, "the host has no route to it"),
])
def test_metadata_not_reachable(attrs, table, why):
    reach = netreach.decide("tasks", attrs, table, ())
    assert (reach.level, reach.metadata) == ("ok", False)
    assert f"169.254.169.254 not reachable ({why})" in reach.message


def test_unknowns_are_warnings():
    no_routes = netreach.decide("bridge", DEFAULT_BRIDGE, None, ())
    assert (no_routes.level, no_routes.metadata) == ("warn", None) and "unknown" in no_routes.message
    no_sockets = netreach.decide("bridge", DEFAULT_BRIDGE, LOCAL_ONLY, None)
    assert (no_sockets.level, no_sockets.services) == ("warn", None)
    assert "cannot list the host's sockets" in no_sockets.message
    macvlan = netreach.decide("lan", {**DEFAULT_BRIDGE, "Driver": "macvlan"}, DEFAULT_ROUTE, LISTENERS)
    assert macvlan.level == "warn" and "driver macvlan" in macvlan.message and "not assessed" in macvlan.message


def test_none_host_container_and_missing_networks():
    none = netreach.decide("none", None, None, None)
    assert (none.level, none.metadata, none.services) == ("ok", False, ())
    host = netreach.decide("host", None, DEFAULT_ROUTE, LISTENERS)
    assert host.level == "warn" and host.metadata is True and host.services == netreach._sorted(LISTENERS)
    assert "loopback included" in host.message
    other = netreach.decide("container:db", None, DEFAULT_ROUTE, LISTENERS)
    assert other.level == "warn" and "inherit" in other.message and other.metadata is None
    missing = netreach.decide("bridge", None, DEFAULT_ROUTE, LISTENERS)
    assert missing.level == "warn" and "network bridge not found" in missing.message
    assert "not reachable" in missing.message


def test_a_long_list_is_counted():
    many = [Listener("0.0.0.0", port) for port in range(1000, 1020)]
    reach = netreach.decide("bridge", DEFAULT_BRIDGE, LOCAL_ONLY, many)
    assert len(reach.services) == 20 and f"and {20 - netreach.MAX_LISTED} more" in reach.message


def test_assess_asks_the_engine_only_for_a_named_network():
    asked = []

    def inspect(name):
        asked.append(name)
        return None
    assert netreach.assess("none", inspect).level == "ok"
    netreach.assess("host", inspect)
    netreach.assess("container:x", inspect)
    assert asked == []
    assert "network bridge not found" in netreach.assess("default", inspect).message
    assert asked == ["bridge"]


# --- metrics -------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["", "127.0.0.1:9464", "127.1.2.3:1", "[::1]:9464", "localhost:9464",
                                    "LOCALHOST:9464"])
def test_loopback_metrics_need_no_warning(listen):
    assert netreach.metrics_exposure_warning(listen) is None


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "172.17.0.1:9464", "192.0.2.5:9464",
                                    "metrics.example:9464"])
def test_non_loopback_metrics_warn_with_the_fix(listen):
    warning = netreach.metrics_exposure_warning(listen)
    assert warning and "not a loopback address" in warning and "bridge networks can reach /metrics" in warning
    assert "127.0.0.1:9464" in warning and "--dport 9464" in warning


# --- the real host -------------------------------------------------------------


def test_a_real_wildcard_listener_is_reachable_from_a_bridge_and_a_loopback_one_is_not():
    with socket.socket() as wild, socket.socket() as local:
        wild.bind(("0.0.0.0", 0))
        local.bind(("127.0.0.1", 0))
        wild.listen()
        local.listen()
        listeners = netreach.host_listeners()
        if listeners is None:
            pytest.skip("psutil may not list sockets here")
        me = psutil.Process(os.getpid()).name()
        wild_l = Listener("0.0.0.0", wild.getsockname()[1], me)
        local_l = Listener("127.0.0.1", local.getsockname()[1], me)
        assert {wild_l, local_l} <= set(listeners)
        for attrs in (DEFAULT_BRIDGE, user_network(internal=True)):  # the latter: gateway 172.30.0.1
            reachable = netreach.reachable_services(netreach.network_from_attrs("n", attrs), listeners)
            assert wild_l in reachable and local_l not in reachable
        reach = netreach.decide("bridge", DEFAULT_BRIDGE, LOCAL_ONLY, listeners)
        assert str(wild_l) in reach.message and str(local_l) not in reach.message


def test_a_process_name_cannot_break_the_line(monkeypatch):
    class Named:
        def __init__(self, pid):
            pass

        def name(self):
            return "evil\n\x1b[31m" + "x" * 100
    monkeypatch.setattr(psutil, "Process", Named)
    name = netreach._process_name(1234)
    assert name.isprintable() and len(name) == netreach.MAX_PROCESS_NAME and name.startswith("evil[31m")
    assert netreach._process_name(None) is None
