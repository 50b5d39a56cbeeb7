"""What the student reads: the stage-1 cache loader (index, order, integrity) and the stage-2 dense datasets."""
