"""Extraction on Ray: `sak-cache run` and the stage-2 cache builder, on one actor pool and teacher worker."""
