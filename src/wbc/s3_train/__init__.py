"""Stage 3 of the main path: fold training (inputs, losses, samplers, optimiser and schedule, steps, the loop)."""
