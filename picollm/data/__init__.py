"""Corpora (sources), token shards (shards), preparation (prepare) and packed loaders (loader)."""
