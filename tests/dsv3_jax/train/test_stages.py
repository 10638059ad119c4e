"""dsv3_jax.train.stages: a stage runs only its real layers (its padding slots are identities, not run), with the
same output and statistics for those layers as the padded stack."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from dsv3_jax import get_preset
from dsv3_jax.kernels import REFERENCE
from dsv3_jax.model.layers.rope import rope_tables
from dsv3_jax.train.loss import LossConfig
from dsv3_jax.train.stages import StageFns, StageLayout, split_variables
from dsv3_jax.train.step import create_train_state
from dsv3_jax.train.optimizer import OptimizerConfig, make_optimizer


def _scan_lengths(fn, *args) -> list[int]:
    """Lengths of the scans in fn's jaxpr, nested ones included."""
    lengths = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                lengths.append(eqn.params["length"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)
    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return lengths


def test_a_stage_runs_its_real_layers_only():
    config = get_preset("tiny").replace(n_layers=4, first_k_dense_replace=1, vocab_size=128, dtype="float32")
    layout = StageLayout((1, 2))   # 3 MoE layers on 2 stages: stage 0 has one padding slot
    state = jax.jit(create_train_state, static_argnums=(0, 1))(config, make_optimizer(OptimizerConfig()),
                                                              jax.random.PRNGKey(0))
    stage_vars, _, _ = split_variables(config, state.params, state.moe_bias, layout)
    stage0 = jax.tree.map(lambda a: a[0], stage_vars)
    fns = StageFns(config, REFERENCE, LossConfig(), layout)
    x_BTD = jax.random.normal(jax.random.PRNGKey(1), (2, 8, config.dim), jnp.float32)
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(8), (2, 8)), config)
    side = {"cos": cos, "sin": sin}

    run = lambda variant: fns.stage(stage0, (x_BTD, jnp.float32(0)), side, variant=variant)
    ((x_real, balance_real), counts_real), ((x_all, balance_all), counts_all) = jax.jit(lambda: (run(1), run(None)))()
    np.testing.assert_allclose(x_real, x_all, rtol=1e-6, atol=1e-6)          # the padding slot is the identity
    np.testing.assert_allclose(balance_real, balance_all, rtol=1e-6)
    assert counts_real.shape == counts_all.shape == (2, config.n_routed_experts)
    np.testing.assert_array_equal(counts_real[0], counts_all[0])
    assert not np.any(counts_real[1])                                          # the skipped slot counts nothing
    layer_scans = lambda variant: [n for n in _scan_lengths(lambda: run(variant)) if n in (1, 2)]
    assert 1 in layer_scans(1) and 2 not in layer_scans(1) and 2 in layer_scans(None)
