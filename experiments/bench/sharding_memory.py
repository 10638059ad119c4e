"""Per-device memory of the sharded train step, per mesh and parameter strategy, from the compiled program (built by
dsv3_jax.train.build and compiled on abstract state, never run). Baseline: the same step on a one-device mesh,
replicated; ratios are per-device bytes over the baseline's.
"""

from __future__ import annotations

import math
import time

from experiments.bench import format_table, require_devices

NAME = "sharding_memory"
SUMMARY = "per-device param / optimizer-state / compiled memory per mesh and strategy (compile only)"
BASELINE = "single device, no mesh"
DEVICES = 8

# `tiny` with dimensions large enough that the state dominates the small tensors, still seconds to compile on CPU.
SCALED = ("dim=256", "n_routed_experts=16", "vocab_size=4096", "moe_intermediate_size=128", "intermediate_size=512",
          "n_layers=3", "dtype=float32")
MESHES = ("data=8/replicated", "data=8/zero1", "fsdp=8/fsdp", "fsdp=4,expert=2/fsdp", "data=2,expert=4/zero1",
          "data=2,tensor=4/replicated")
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "host_argument_size_in_bytes", "host_output_size_in_bytes",
                 "host_alias_size_in_bytes", "host_temp_size_in_bytes", "host_generated_code_size_in_bytes")


def add_arguments(parser) -> None:
    parser.add_argument("--meshes", nargs="+", default=list(MESHES), metavar="AXES/STRATEGY",
                        help="meshes as axis=size[,axis=size]/strategy (default: %(default)s)")
    parser.add_argument("--preset", default="tiny", help="model preset (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"model override, after the built-in {' '.join(SCALED)}")
    parser.add_argument("--batch", type=int, default=8, help="global sequences per micro-batch (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--micro", type=int, default=1, help="micro-batches per step (default: %(default)s)")


def parse_mesh(text: str) -> tuple[dict[str, int], str]:
    """'fsdp=4,expert=2/fsdp' -> ({'fsdp': 4, 'expert': 2}, 'fsdp')."""
    axes_text, sep, strategy = text.rpartition("/")
    if not sep or not strategy:
        raise SystemExit(f"--meshes {text!r}: expected axis=size[,axis=size]/strategy")
    axes = {}
    for item in filter(None, axes_text.split(",")):
        name, eq, size = item.partition("=")
        if not eq or not size.lstrip("-").isdigit():
            raise SystemExit(f"--meshes {text!r}: {item!r} is not axis=size")
        axes[name.strip()] = int(size)
    return axes, strategy


def model_config(args):
    from dsv3_jax.config.presets import get_preset

    return get_preset(args.preset).with_overrides(*SCALED, *args.overrides).validate()


def shard_bytes(abstract, shardings, device) -> int:
    """Bytes of `device`'s shard of every leaf of `abstract` (None shardings: the whole leaf)."""
    import jax

    leaves = jax.tree.leaves(abstract)
    if shardings is None:
        sharding_leaves = [None] * len(leaves)
    else:
        sharding_leaves = jax.tree.leaves(shardings)
        assert len(sharding_leaves) == len(leaves), "shardings must match the state leaf for leaf"
    total = 0
    for leaf, sharding in zip(leaves, sharding_leaves):
        if sharding is None:
            n = math.prod(leaf.shape)
        else:
            index = sharding.devices_indices_map(tuple(leaf.shape))[device]
            n = math.prod(len(range(*s.indices(d))) for s, d in zip(index, leaf.shape))
        total += n * leaf.dtype.itemsize
    return total


def state_bytes(abstract, shardings, device) -> dict:
    """Exact per-device bytes of the TrainState's parts; `shardings` None: unsharded."""
    part = lambda name: shard_bytes(getattr(abstract, name), None if shardings is None else getattr(shardings, name),
                                    device)
    out = {"params_bytes": part("params"), "moe_bias_bytes": part("moe_bias"), "opt_state_bytes": part("opt_state")}
    out["state_bytes"] = sum(out.values()) + part("step") + part("rng")
    return out


def memory(compiled) -> dict:
    """XLA's memory analysis fields of a compiled program, and total = its peak (dsv3_jax.train.build)."""
    from dsv3_jax.train.build import compiled_memory

    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    out = {field: int(getattr(stats, field)) for field in MEMORY_FIELDS if hasattr(stats, field)}
    out["total_bytes"] = compiled_memory(compiled)["peak"]
    return out


def run(args) -> dict:
    """For each (mesh, strategy) the train step is built (dsv3_jax.train.build) and compiled on abstract state,
    never run. Two kinds of numbers per device:
      exact:    bytes of device 0's shard of every parameter, routing-bias and optimizer-state leaf (from the
                shardings: the slice devices_indices_map gives device 0);
      compiled: XLA's memory analysis of the compiled step (argument, output, aliased = donated state, temp), and
                total = argument + output − alias + temp.
    On XLA:CPU the compiled sizes are XLA:CPU's buffer assignment; a GPU compile will differ in temp."""
    import jax

    from dsv3_jax.train.build import build_step
    from dsv3_jax.train.run_config import compile_run
    from sharding import build_mesh

    meshes = [parse_mesh(text) for text in args.meshes]
    devices = require_devices(max(math.prod(v for v in axes.values() if v > 0) for axes, _ in meshes))
    config = model_config(args)
    device = jax.devices()[0]

    def measure(axes, strategy, mesh_devices):
        start = time.perf_counter()
        mesh = build_mesh(axes, mesh_devices)
        step = build_step(compile_run(config, batch=args.batch, seq_len=args.seq_len, micro=args.micro,
                                      strategy=strategy), mesh)
        compiled = step.compile().compiled
        return step, dict(mesh=",".join(f"{k}={v}" for k, v in axes.items()), strategy=strategy, devices=mesh.size,
                          **state_bytes(step.abstract_state, step.shardings, device), **memory(compiled),
                          compile_s=time.perf_counter() - start)

    single, baseline = measure({"data": 1}, "replicated", [device])
    baseline.update(mesh="single", strategy="-")
    rows = []
    for axes, strategy in meshes:
        size = math.prod(v for v in axes.values() if v > 0)
        rows.append(measure(axes, strategy, devices if -1 in axes.values() else devices[:size])[1])
    for row in [baseline] + rows:
        for key in ("params_bytes", "opt_state_bytes", "state_bytes", "argument_size_in_bytes",
                    "temp_size_in_bytes", "total_bytes"):
            if key in row and baseline.get(key):
                row[key.replace("_size_in_bytes", "").replace("_bytes", "") + "_vs_single"] = row[key] / baseline[key]
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(single.abstract_state.params))
    cfg = dict(preset=args.preset, overrides=list(SCALED) + list(args.overrides), n_params=n_params,
               param_dtype=config.param_dtype, dtype=config.dtype, batch=args.batch, seq_len=args.seq_len,
               micro=args.micro, optimizer="AdamW (mu, nu float32)", memory_source=f"XLA:{device.platform.upper()} "
               "compiled memory_analysis, per device", exact_source="device 0's shard of each state leaf")
    return {"config": cfg, "baseline": baseline, "rows": rows}


MIB = 2.0 ** 20


def _mib(key):
    return lambda row: row[key] / MIB if key in row else None


COLUMNS = [("mesh", "mesh", "s"), ("strategy", "strategy", "s"),
           ("params MiB", _mib("params_bytes"), ".2f"), ("opt MiB", _mib("opt_state_bytes"), ".2f"),
           ("state MiB", _mib("state_bytes"), ".2f"), ("state ×", "state_vs_single", ".3f"),
           ("params ×", "params_vs_single", ".3f"), ("opt ×", "opt_state_vs_single", ".3f"),
           ("arg MiB", _mib("argument_size_in_bytes"), ".2f"), ("out MiB", _mib("output_size_in_bytes"), ".2f"),
           ("alias MiB", _mib("alias_size_in_bytes"), ".2f"), ("temp MiB", _mib("temp_size_in_bytes"), ".2f"),
           ("total MiB", _mib("total_bytes"), ".2f"), ("total ×", "total_vs_single", ".3f"),
           ("temp ×", "temp_vs_single", ".3f"), ("compile s", "compile_s", ".1f")]


def table(result: dict) -> str:
    c = result["config"]
    head = (f"{c['preset']} + {' '.join(c['overrides'])}: {c['n_params'] / 1e6:.2f}M params; batch {c['micro']}×"
            f"{c['batch']}×{c['seq_len']} tokens; per-device bytes, exact (state) and {c['memory_source']}; "
            f"× = ratio to the baseline ({BASELINE}); total = arg + out − alias + temp")
    return head + "\n" + format_table([result["baseline"]] + result["rows"], COLUMNS)
