"""Engine code shared by slm_service and llm_service: the backend interface, the hf backend and the gRPC server."""
