"""Server-side gRPC plumbing shared by the verifier, the edge server and the gateway:
token auth, TLS, health and reflection, graceful drain, and the one place where
internal errors become gRPC status codes."""
