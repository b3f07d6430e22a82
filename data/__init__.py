"""Data pipeline: webdataset shards -> PackedBatch, and the built-in synthetic benchmark."""
