"""Ray Train recipes: two-stage (projector, then full or LoRA) fine-tuning with DeepSpeed, and LoRA
tuning of off-the-shelf VLMs; run.py drives the stages, loop.py is what each worker runs. contrastive.py
trains a CLIP-style image/text model (`recipe: contrastive`)."""
