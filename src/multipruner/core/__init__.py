"""The pruning core: adapters per model family, plans, channel order, masking (surgery), extraction
and checkpoints. Imports nothing from the search, repair, runs, evaluation or the CLI."""
