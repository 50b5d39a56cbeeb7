"""The ground floor both sides stand on: errors, provenance, units, the registry, typed JSON, the lock."""
