"""The contract between the SDK and the servers: the generated stubs (`protocol.v1`),
the request limits and their validation, the value types (modes, drafting options,
chunks, statistics) with their proto converters, the error hierarchy and how channels
are opened. Needs grpcio and protobuf only, like the SDK that is built on it."""
