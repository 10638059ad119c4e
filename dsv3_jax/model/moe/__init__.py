"""DeepSeekMoE: routing, the MoE layer, and the kernel backend it calls."""
