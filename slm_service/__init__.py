"""The SLM engine service: the shared engine (package `engine`) with SLM defaults."""
