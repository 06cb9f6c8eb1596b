"""migrate: live-migrate running Linux workloads between hosts over SSH, on CRIU."""

__version__ = "0.1.0"
