"""Model families: what a whole family of checkpoints (Gemma 4) knows beyond the parts vlmtrain assembles."""
