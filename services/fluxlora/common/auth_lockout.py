"""Slowing down token guessing: a client address that fails authentication `max_failures` times within
`window_s` seconds is locked out for `lockout_s` seconds, during which every call it makes is refused
before its token is looked at. Pure bookkeeping (no gRPC): fluxlora.common.auth asks it.

Choices, and why:
- Keyed by address without the port (a client opens a new port per connection) and, for IPv6, by
  the /64 (one host usually holds a whole /64 and could otherwise rotate through it).
- During a lockout even the right token is refused. Letting it through would need the token compared,
  and then the answer itself (refused vs. served) tells a guesser which guess was right: the lockout
  would throttle nothing. sshd's PerSourcePenalties and fail2ban block the source the same way. The
  cost is that clients sharing an address (behind a NAT or a proxy) share the lockout; where a proxy
  hides client addresses, turn this off (max_failures 0) and limit in the proxy.
- A success does not reset the count, so a good client on the same address cannot keep a guesser's
  count from ever reaching the limit.
- Refusals during a lockout do not extend it: a client retrying with a stale token gets in again
  `lockout_s` after its last failure counted, not never.
- Memory is bounded: at most `max_peers` addresses are tracked, each with at most `max_failures`
  timestamps; the least recently seen address is forgotten first.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote


def peer_key(peer: str) -> str:
    """The address a lockout applies to, from gRPC's peer string: "ipv4:10.0.0.7:51234" -> "10.0.0.7",
    "ipv6:%5B2001:db8::1%5D:443" -> "2001:db8::/64"; anything else (unix sockets) as given."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # (drop an IPv6 zone id)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        if not address.is_loopback:
            return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class _Peer:
    failures: deque = field(default_factory=deque)  # monotonic times of failures within the window
    locked_until: float = 0.0


class FailedAuthLimiter:
    """Counts failed authentications per address and says which addresses are locked out."""

    def __init__(self, max_failures: int, window_s: float, lockout_s: float, max_peers: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if max_failures < 1 or window_s <= 0 or lockout_s <= 0 or max_peers < 1:
            raise ValueError("max_failures, window_s, lockout_s and max_peers must be positive")
        self.max_failures, self.window_s, self.lockout_s, self.max_peers = max_failures, window_s, lockout_s, max_peers
        self._clock = clock
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._lock = threading.Lock()

    def locked_for(self, key: str) -> float:
        """Seconds the address stays locked out; 0 when it may try."""
        with self._lock:
            peer = self._peers.get(key)
            if peer is None:
                return 0.0
            left = peer.locked_until - self._clock()
            if left > 0:
                self._peers.move_to_end(key)  # an address still knocking is not the one to forget
                return left
            return 0.0

    def failed(self, key: str) -> bool:
        """Records one failed authentication; True when it starts a lockout (the caller logs that once)."""
        with self._lock:
            now = self._clock()
            peer = self._peers.get(key)
            if peer is None:
                peer = self._peers[key] = _Peer()
                while len(self._peers) > self.max_peers:
                    self._peers.popitem(last=False)
            self._peers.move_to_end(key)
            if peer.locked_until > now:
                return False  # (a failure while locked out cannot happen through the interceptor)
            while peer.failures and peer.failures[0] <= now - self.window_s:
                peer.failures.popleft()
            peer.failures.append(now)
            if len(peer.failures) < self.max_failures:
                return False
            peer.failures.clear()
            peer.locked_until = now + self.lockout_s
            return True

    def tracked(self) -> int:
        """How many addresses are remembered (bounded by max_peers)."""
        return len(self._peers)
