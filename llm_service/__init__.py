"""The LLM engine service: the shared engine (package `engine`) with LLM defaults."""
