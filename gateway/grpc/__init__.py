"""The gRPC transport: thin servicers, pb <-> domain converters, error mapping, server assembly."""
