"""Whole jobs built on the rest: tiny CPU training, reproduce, the lambda study, data preparation."""
