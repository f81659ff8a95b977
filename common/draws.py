"""Random draws keyed by what they are for, never taken from a shared stream.

Every random choice of a session (a sampled token, a routing decision, a speculative acceptance) is
`uniform(seed, position, purpose)`: a function of the session's seed, the answer position it decides
and its purpose. So a session gives the same answer alone or batched with others, on any replica, and
after any failure, whoever draws and in whatever order.
"""

import hashlib

TOKEN, ACCEPT, RESIDUAL, ROUTE = "token", "accept", "residual", "route"


def uniform(seed: int, position: int, purpose: str) -> float:
    """A number in [0, 1), the same for the same (seed, position, purpose)."""
    digest = hashlib.blake2b(f"{seed}:{position}:{purpose}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2**53  # 53 bits: exact in a float, never 1.0
