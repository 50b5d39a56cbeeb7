"""Teacher-feature caches: extracted once on Ray, verifiable, read by any number of trainings.

base/        the ground floor both sides stand on: errors, provenance, units, Registry, typed JSON, lock
buckets/     caches at s3:// and gs:// URLs: mirrors, whole-object uploads, the lock object
sources/     images in: folders, WebDataset tars, Parquet; decoding; the view plan
format/      the cache format v1: records, file layout, JSON Schema, documents, manifests, journal
teachers/    the registered teachers, their weights and their multi-level forward
store/       what a stored target is (codec, pca basis, levels and grid, fidelity) and its stores
extraction/  `sak-cache run` and `sak-cache stage2` on Ray: one teacher worker, one actor pool
inspection/  verify, describe (inspect, ls), show, estimate
"""
