"""vlmtrain: training mixed-budget vision encoders for vision-language models."""

__version__ = "0.1.0"
