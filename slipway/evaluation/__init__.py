"""Evaluation: metrics over model outputs, and the paired statistics that gates decide with."""
