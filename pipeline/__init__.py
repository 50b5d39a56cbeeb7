"""Teacher-feature extraction: sources, view plan, teachers, Ray job, stores and manifests."""
