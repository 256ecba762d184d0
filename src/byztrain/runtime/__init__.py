"""Runtimes: the simulated one (all peers in one process) and the distributed one (a process per peer)."""
