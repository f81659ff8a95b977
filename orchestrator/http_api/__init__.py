"""The OpenAI-compatible HTTP API: a second door onto the orchestrator's sessions (`--http-port`).

The gRPC API stays the contract of record; this one maps the OpenAI request and response shapes onto
the same Orchestrator.generate, in the same process, under the same admission limits, leases and
sessions. `schema` reads requests, `stream` runs a generation for the event loop, `render` writes
responses and chunks, `errors` OpenAI-shaped error bodies, `app` the routes, `server` uvicorn.
"""
