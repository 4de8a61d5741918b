"""A prune run as phases over one resumable run directory: search, compensate, extract, recover,
evaluate, report."""
