"""Exports: a trained model as a folder that loads without the training stack (see :mod:`.write`)."""
