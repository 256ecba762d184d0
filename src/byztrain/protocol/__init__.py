"""BTARD-SGD, the protocol: partition layout, commitments, MPRNG, the random-projection check,
validators, accusations and bans, and the step that ties them together (`btard.BtardDefense`).

Every phase is written SPMD-style over `comm.local_peers` and exchanges messages only through the
Collective; see docs/protocol.md for the algorithm as implemented and its assumptions.
"""
