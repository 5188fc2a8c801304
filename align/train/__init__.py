"""Training: SFT and DPO over TRL's trainers, the shared training run, and the memory planner. Built on align.core."""
