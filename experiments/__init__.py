"""Experiments on top of `reparam`: data, models, the training loop, sweeps and reports (reparam never imports it)."""
