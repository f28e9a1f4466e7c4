"""Evaluation: graders and the in-training evaluation callback."""
