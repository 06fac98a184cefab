"""minipara: prompt-aware parameter-efficient fine-tuning in plain PyTorch."""
__version__ = "0.1.0"
