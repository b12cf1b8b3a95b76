"""Training stack: `python -m train.train`, `train.validate`, `train.benchmark`, `train.report` (timm utilities, torchrun/DDP)."""
