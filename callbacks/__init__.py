"""Training callbacks: memory, throughput, attention maps, gate monitor."""
