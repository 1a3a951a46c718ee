"""The input side: data sources, per-sample transforms and the grain pipeline."""
