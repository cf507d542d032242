"""Evaluation: classification accuracy (top-1/top-5) over labelled shards; no MLflow, no stages."""
