"""Speed, memory and FLOPs, measured the paper's way."""
