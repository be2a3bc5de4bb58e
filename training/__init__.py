"""mpcl.training: datasets, networks, the one training loop, methods, metrics and evaluation (needs torch)."""
