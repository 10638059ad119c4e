"""The pipeline-parallel train step equals the single-device train step (loss, metrics, params, moe_bias, optimizer
state) on 8 simulated CPU devices with DualPipe and the stages' experts split over an `expert` axis (every schedule's
loss and gradients, also over 4 stages with data parallelism, are held to the single-device ones in
tests/sharding/test_pipeline.py; each step compile here costs a minute on 2 cores), with a MoE stack that does not
split evenly into the stages (padding layers) and the first and last stages' parameters split over the batch axes; a
MoE stack with fewer layers than stages is refused."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

PIPELINED_SCRIPT = textwrap.dedent("""
    import os
    # Compile-time flags only (the test is compile-bound); the reference step compiles under the same ones.
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true")
    import sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_disable_most_optimizations", True)
    from dsv3_jax import get_preset
    from dsv3_jax.train.loss import LossConfig
    from dsv3_jax.train.optimizer import OptimizerConfig
    from dsv3_jax.train.pipelined import make_pipelined_train_step
    from dsv3_jax.train.schedule import ScheduleConfig
    from dsv3_jax.train.step import BalanceConfig, create_train_state, make_train_step
    from sharding.mesh import build_mesh

    # 1 dense + 3 MoE layers (2 stages: the first runs 2; the last, which also runs the MTP module and head, 1
    # and a padding layer) or 1 dense + 4 MoE layers
    # (4 stages), MTP on. eps well above float noise, so Adam's first step
    # g / (|g| + eps) is continuous in g and reduction-order differences stay small.
    config = get_preset("tiny").replace(n_layers=int(sys.argv[3]), first_k_dense_replace=1, vocab_size=128,
                                        dtype="float32")
    configs = (LossConfig(), ScheduleConfig(peak_lr=1e-2, warmup=1), OptimizerConfig(eps=1e-3),
               BalanceConfig(gamma=0.01))
    M, B, T = 8, 4, 16
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (M, B, T)).astype(np.int32)
    # Packed documents and padding, different in every row: batch shards hold different numbers of targets.
    starts = rng.integers(3, T - 3, (M, B, 1))
    segments = np.where(np.arange(T) < starts, 1, 2).astype(np.int32)
    for m in range(M):   # micro-batches of different real-token counts: the step averages over all tokens
        segments[m, 1, -rng.integers(1, 9):] = 0
    positions = np.where(segments == 2, np.arange(T) - starts, np.arange(T)).astype(np.int32)
    batches = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments),
               "positions": jnp.asarray(positions)}
    args = (jnp.float32(0), jnp.float32(np.inf))

    tx, step = make_train_step(config, *configs)
    state = jax.jit(create_train_state, static_argnums=(0, 1))(config, tx, jax.random.PRNGKey(0))
    want, want_metrics = jax.jit(step)(state, batches, *args)

    def check(got, metrics):
        assert set(metrics) == set(want_metrics), sorted(set(metrics) ^ set(want_metrics))
        np.testing.assert_allclose(float(metrics["loss"]), float(want_metrics["loss"]), rtol=1e-5)
        np.testing.assert_array_equal(metrics["expert_counts_LE"], want_metrics["expert_counts_LE"])
        assert int(metrics["skipped"]) == 0
        for key in want_metrics:
            np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
        got_leaves = jax.tree_util.tree_leaves_with_path((got.params, got.moe_bias, got.opt_state))
        want_leaves = jax.tree.leaves((want.params, want.moe_bias, want.opt_state))
        assert len(got_leaves) == len(want_leaves)
        for (path, a), b in zip(got_leaves, want_leaves):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        assert int(got.step) == 1

    # argv[1]: schedules with 2 stages, expert-parallel inside them (2 of the 8 experts per rank: the lowered step
    # exchanges tokens with all_to_all); argv[2]: schedules with 4 stages and data parallelism.
    for sizes, names in [(dict(pipeline=2, expert=4), sys.argv[1].split(",")),
                         (dict(pipeline=4, data=2), [n for n in sys.argv[2].split(",") if n])]:
        mesh = build_mesh(sizes)
        for name in names:
            # split_min_size=0: the first and last stages' parameters are split over the batch axes and gathered.
            _, pipelined_step = make_pipelined_train_step(config, *configs, mesh, name, M, split_min_size=0)
            lowered = jax.jit(pipelined_step).lower(state, batches, *args)
            assert ("all_to_all" in lowered.as_text()) == (sizes.get("expert", 1) > 1), (sizes, name)
            check(*lowered.compile()(state, batches, *args))
            print(sizes, name, "ok", flush=True)

    # 1 MoE layer does not fill 2 stages.
    try:
        make_pipelined_train_step(config.replace(n_layers=2), *configs, build_mesh(dict(pipeline=2, data=4)),
                                  "1f1b", M)
    except ValueError as error:
        print("error:", error)
    print("ok")
""")


def test_pipelined_step_equals_single_device_step():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", PIPELINED_SCRIPT, "dualpipe", "", "4"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr[-3000:]
    assert result.stdout.count(" ok\n") == 1, result.stdout
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mesh.pipeline=2" in errors[0] and "model.n_layers=2" in errors[0], result.stdout
