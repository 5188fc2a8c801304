"""`align run`: recipes of stages (sft, pairs, dpo, merge, eval) over align.train, merge and eval."""
