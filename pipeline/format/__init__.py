"""The cache format: typed records, file layout, JSON Schema, documents, manifests and the shard journal."""
