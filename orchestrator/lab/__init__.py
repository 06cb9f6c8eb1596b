"""Local test lab: N "hosts" on one machine, each a real sshd as pid 1 of its own pid, mount
and UTS namespaces inside its own network namespace, joined by a bridge in the root namespace.

``up()`` builds it and writes ``lab_dir/migrate.yaml``; ``down()`` removes it; ``load()`` /
``status()`` read the state file ``lab_dir/lab.json``; ``exec_argv()`` runs a command on a
host (or on ``client``, a plain namespace on the same switch for test clients).
Faults for tests (``faults``): ``kill_host()`` / ``revive_host()`` crash a host and boot it again;
``cut_link()`` / ``mend_link()`` cut the network between two hosts and mend it.
"""

from .core import down, exec_argv, load, status, up
from .faults import cut_link, host_up, kill_host, link_cut, mend_link, revive_host
from .state import CLIENT, CLIENT_ADDRESS, DEFAULT_DIR, HostStatus, Lab, LabError, LabHost

__all__ = [
    "CLIENT",
    "CLIENT_ADDRESS",
    "DEFAULT_DIR",
    "HostStatus",
    "Lab",
    "LabError",
    "LabHost",
    "cut_link",
    "down",
    "exec_argv",
    "host_up",
    "kill_host",
    "link_cut",
    "load",
    "mend_link",
    "revive_host",
    "status",
    "up",
]
