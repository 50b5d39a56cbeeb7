"""Bucket storage: caches at s3:// and gs:// URLs, node-local mirrors, whole-object uploads, the lock object."""
