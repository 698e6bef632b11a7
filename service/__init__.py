"""Transport and orchestration: engines, the CLI and (later) the gRPC service."""
