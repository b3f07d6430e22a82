"""casa: vision-language fusion research (token insertion, Q-Former, cross-attention, CASA)."""
