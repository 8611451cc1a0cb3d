"""Synthetic datasets used to train and benchmark the models shipped with camserve."""

from app.datasets.shapes import CLASSES, ShapeSample, generate_sample, make_dataset

__all__ = ["CLASSES", "ShapeSample", "generate_sample", "make_dataset"]
