"""Datasets: config schema, records, buckets, images, captions, conditioning images, the torch Dataset and its batches."""
