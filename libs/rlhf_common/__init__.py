"""Shared building blocks of the RLHF services: config, bus, weights, metrics, algorithms."""
