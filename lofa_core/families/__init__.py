"""Per-family rules: how to recognise a base model and enumerate its LoRA targets."""
