"""The model's own code, from an image and a prompt to logits: geometry, pixels, prompt ids, vision backbones,
pooling, projectors, the vision-language composition, and its transformers configuration, model and processor.

Every module here is copied as it is into every export that loads as one transformers model
(:mod:`vlmtrain.export.transformers_model`), where vlmtrain is not installed. So a module here imports only
the standard library, torch, transformers, numpy, PIL, safetensors and its siblings (relative imports);
``scripts/test.sh`` checks it (``lint-imports``, the contracts in pyproject.toml).
"""
