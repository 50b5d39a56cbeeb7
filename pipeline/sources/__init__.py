"""Images in: source listing by kind (folder, WebDataset tars, Parquet), decoding, the view plan."""
