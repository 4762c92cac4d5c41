"""The `eagle` command and what it runs: the demo, draft-head training, corpora."""
