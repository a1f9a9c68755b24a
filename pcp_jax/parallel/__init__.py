"""Per-shard parallel primitives for the `cp` mesh axis: zigzag layout, ring attention, GDN across ranks."""
