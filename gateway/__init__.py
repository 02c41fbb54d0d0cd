"""A gRPC model gateway for safe ML releases."""

__version__ = "0.1.0"
