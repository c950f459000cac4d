"""Training: losses (pure functions), the teacher and distillation loops, loop machinery."""
