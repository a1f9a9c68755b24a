"""Run per-shard functions on a `cp` mesh of virtual CPU devices, as the engine does."""

import jax
import numpy as np
from jax.sharding import Mesh


def mesh(cp: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[:cp]), ("cp",))


def run(fn, cp: int, in_specs, out_specs, *args):
    return jax.jit(jax.shard_map(fn, mesh=mesh(cp), in_specs=in_specs, out_specs=out_specs, check_vma=False))(*args)
