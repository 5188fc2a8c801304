"""alignmerge: LoRA SFT, DPO with the adapter as its own reference, merging and evaluation."""

__version__ = "0.1.0"
