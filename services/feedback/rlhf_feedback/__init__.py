"""Feedback service: production feedback on served answers, and its join to the exact generation."""
