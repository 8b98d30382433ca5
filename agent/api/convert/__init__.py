"""Pure protobuf ↔ model conversions, one module per resource (beside the handler modules)."""
