"""Loaded by every Python subprocess the tests start (PYTHONPATH): refuse non-loopback sockets.

Multi-process tests need loopback (gloo rendezvous, the local W&B service); anything else
means a test reached for the network.
"""

import ipaddress
import socket

_connect = socket.socket.connect


def _loopback(address) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
        raise OSError(f"network access blocked in xmodal tests: {address!r}")
    return _connect(self, address)


socket.socket.connect = _guarded_connect
