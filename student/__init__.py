"""The SAK student, laid out by the data flow: model/ (the networks and their weights), data/ (what they
read), train/ (stage 1, stage 2, and what both use to train and evaluate)."""
