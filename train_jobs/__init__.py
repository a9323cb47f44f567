"""Ray Train recipes: two-stage fine-tuning with DeepSpeed (see the training issue)."""
