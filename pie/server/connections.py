"""How many connections the daemon takes: its descriptor limit, caps per listener and address.

Every connection costs a file descriptor. Most Linux systems start a process
with a soft limit of 1024 but allow far more (the hard limit); a daemon that
keeps the soft one runs out under a few hundred slow clients, and then accepts
nothing at all, not even the client listener's well-behaved users. So the
daemon raises its soft limit to the hard one at start, and caps the
connections of a listener (in total and per client address) below it,
leaving headroom for model files, workers, HTTP server instances and logs.
"""

from __future__ import annotations

import re
import resource
from collections import Counter
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

log = Logger()

MIN_HEADROOM = 256
"""Descriptors always left free by the connection cap (files, workers, HTTP servers, logs)."""
AUTO_MAX_CONNECTIONS = 16384
"""The most connections the automatic cap (max_connections = 0) allows, whatever the fd limit."""
DEFAULT_LISTEN_BACKLOG = 1024


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit where allowed; the soft limit after.

    Logs the change (or why there was none to make).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.info("file descriptor limit: {soft} (already the hard limit)", soft=soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warn(
            "file descriptor limit stays {soft}: raising it to {target} failed ({e})",
            soft=soft,
            target=target,
            e=e,
        )
        return soft
    log.info("file descriptor limit raised from {soft} to {target}", soft=soft, target=target)
    return target


def auto_max_connections(fd_limit: int) -> int:
    """The connection cap for a descriptor limit: a quarter (at least MIN_HEADROOM) kept free."""
    headroom = max(MIN_HEADROOM, fd_limit // 4)
    return max(1, min(AUTO_MAX_CONNECTIONS, fd_limit - headroom))


def connection_caps(settings: dict[str, Any], fd_limit: int) -> tuple[int, int]:
    """(max_connections, max_connections_per_address), 0 in the settings meaning automatic.

    Automatic: auto_max_connections(fd_limit), and half of that per address.
    """
    total = settings["max_connections"] or auto_max_connections(fd_limit)
    per_address = settings["max_connections_per_address"] or max(1, total // 2)
    return total, min(per_address, total)


def auto_server_instance_connections(fd_limit: int) -> int:
    """The automatic cap on HTTP server instances' connections: half the client listener's headroom.

    The client listener may use all but max(MIN_HEADROOM, fd_limit // 4)
    descriptors; the server instances together take at most half of what it
    leaves, so a slowloris against them cannot starve the client listener,
    and the other half stays for files, workers and logs.
    """
    headroom = max(MIN_HEADROOM, fd_limit // 4)
    return max(1, min(AUTO_MAX_CONNECTIONS, headroom // 2))


def server_instance_caps(settings: dict[str, Any], fd_limit: int) -> tuple[int, int]:
    """(total, per address) for all HTTP server instances together, 0 meaning automatic.

    Automatic: auto_server_instance_connections(fd_limit), and the whole of it
    per address (server instances listen on 127.0.0.1, so their clients are
    usually one local proxy).
    """
    total = settings["inferlet_server_max_connections"] or auto_server_instance_connections(
        fd_limit
    )
    per_address = settings["inferlet_server_max_connections_per_address"] or total
    return total, min(per_address, total)


def listen_endpoint(reactor: Any, description: str, backlog: int) -> IStreamServerEndpoint:
    """The server endpoint of `description`, with `backlog` unless the string names its own."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl", "unix") and not re.search(r"(^|:)backlog=", description):
        description = f"{description}:backlog={backlog}"
    return serverFromString(reactor, description)


class ConnectionCounter:
    """Open connections of one listener, in total and per client address."""

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.total = 0
        self.by_address: Counter[str] = Counter()

    def admit(self, address: str) -> str | None:
        """Count a new connection from `address`, or say why it is refused (not counted)."""
        if self.total >= self.max_connections:
            return (
                f"too many connections: the server has {self.total} open "
                f"(max_connections = {self.max_connections}); try again later"
            )
        if self.by_address[address] >= self.max_per_address:
            return (
                f"too many connections from {address}: {self.by_address[address]} open "
                f"(max_connections_per_address = {self.max_per_address})"
            )
        self.total += 1
        self.by_address[address] += 1
        return None

    def release(self, address: str) -> None:
        """An admitted connection from `address` is gone."""
        self.total -= 1
        self.by_address[address] -= 1
        if not self.by_address[address]:
            del self.by_address[address]
