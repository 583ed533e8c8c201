"""This machine's name as runs record it: ``SO8T_HOST_ID``, else the host name.

Liveness and ownership of a run differ between "this host" (the session folder's OS lock
tells) and "another host" (only MLflow tells). ``SO8T_HOST_ID`` lets two machines that share
a host name tell themselves apart, and lets tests play two hosts on one machine.
"""

from __future__ import annotations

import os
import socket


def host_id() -> str:
    """The id this process records for its host (no ``:``: it starts a claimant id)."""
    return (os.environ.get("SO8T_HOST_ID") or socket.gethostname()).replace(":", "_")
