"""End-to-end finetuning from videos: the plan, the model, its state and run directory, DDP, augmentation."""
