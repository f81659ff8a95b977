"""Training the project's own SLM/LLM pair on a synthetic chain-of-thought arithmetic task."""
