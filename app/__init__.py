"""camserve: REST inference and class-activation-map explanations for PyTorch classifiers."""

__version__ = "0.1.0"
