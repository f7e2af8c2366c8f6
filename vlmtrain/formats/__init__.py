"""Export formats: how a trained model leaves the framework (see :mod:`vlmtrain.export`)."""
