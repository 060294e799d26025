"""Per-silo backoff for failed handshakes.

A silo whose handshake fails (its data check failed, its ClientApp crashes, it never answers) is
not refused for good: it may be fixed and come back. But asking it again every round costs a whole
round timeout per attempt when it does not answer, so after the k-th failure in a row it is asked
again only after 2**(k-1) rounds (1, 2, 4, ...), at most CAP_ROUNDS rounds later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CAP_ROUNDS = 8


@dataclass
class HandshakeBackoff:
    cap_rounds: int = CAP_ROUNDS
    failures: dict[int, int] = field(default_factory=dict)
    next_round: dict[int, int] = field(default_factory=dict)

    def due(self, node_id: int, server_round: int) -> bool:
        """May this node be asked for its handshake in this round (0 = before the first)?"""
        return server_round >= self.next_round.get(node_id, 0)

    def failed(self, node_id: int, server_round: int) -> int:
        """Record a failure; returns the round in which the node will be asked again."""
        k = self.failures.get(node_id, 0) + 1
        self.failures[node_id] = k
        self.next_round[node_id] = server_round + min(2 ** (k - 1), self.cap_rounds)
        return self.next_round[node_id]

    def succeeded(self, node_id: int) -> None:
        self.failures.pop(node_id, None)
        self.next_round.pop(node_id, None)
