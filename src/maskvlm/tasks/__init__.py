"""Tasks: what a trainer runs (pre-training objectives) and what is measured (retrieval)."""
