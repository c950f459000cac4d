"""Networks: EDM layers and U-Nets, preconditioning, samplers."""
