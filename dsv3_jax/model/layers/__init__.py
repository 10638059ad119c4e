"""Building blocks of the network: norm, rotary embedding, linear, MLA attention, MLP."""
