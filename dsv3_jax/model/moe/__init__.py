"""DeepSeekMoE: routing, the MoE layer, the routed experts' SwiGLU, and the kernel backend it calls."""
