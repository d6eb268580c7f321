"""Whole federations on one machine: generated and real virtual sites, presets, reports."""
