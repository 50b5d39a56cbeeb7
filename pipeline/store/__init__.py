"""Teacher stores: what a target is (codec, low-rank basis, levels and grid, fidelity) and its Zarr and
WebDataset backends."""
