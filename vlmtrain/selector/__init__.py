"""The automatic budget: labels from the model's own losses at every level, a small selector trained on
them, and the per-image choice it makes (``budget="auto"``)."""
