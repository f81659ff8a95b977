"""The stateless orchestrator: Algorithm 1 over two engines, sessions kept in a session store."""
