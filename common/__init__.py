"""What the engines and the orchestrator share: errors and their gRPC codes, admission limits, the
gRPC server helper, tracing and metrics, and command-line flag types. Imports nothing of theirs."""
