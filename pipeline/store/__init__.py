"""Cache stores: the Zarr backend (and, later, WebDataset) behind one small interface."""
