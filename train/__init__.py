"""Training stack: `python -m train.train`, `train.validate`, `train.report` (timm utilities, torchrun/DDP)."""
