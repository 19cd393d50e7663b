"""Data engineering: ingest, clean, dedup, quality filters, mixture, token shards."""
