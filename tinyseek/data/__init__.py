"""Data engineering: ingest, clean, dedup, quality filters, mixture, token shards.

Read in this order (one concept a file; ``pipeline.py`` wires them into ``tinyseek data``):

- ``ingest.py``   streaming JSONL / Parquet / text readers -> ``Doc(text, source, loc, error)``
- ``sources.py``  the default corpus (Shakespeare, KJV, Python docs, People's Daily, stdlib, maths)
- ``clean.py``    NFKC + whitespace cleanup, Gopher-style heuristics (CJK-aware)
- ``dedup.py``    exact (xxhash/MD5) and near (MinHash LSH) deduplication
- ``quality.py``  character entropy, character n-gram perplexity filter
- ``mixture.py``  static + TF-IDF domain weights, quotas, sampling order
- ``shards.py``   packed uint16/uint32 token shards and the resumable DDP-aware loader
- ``pipeline.py`` the stage: Config, presets (sample, cpu-tiny, full), report and manifest
"""
