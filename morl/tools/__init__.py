"""Offline commands around training: the pass-rate filter, run comparison, hardware preflight."""
