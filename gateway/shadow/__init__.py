"""Shadow traffic: mirrored runs off the critical path, output comparison, diff logs, reports."""
