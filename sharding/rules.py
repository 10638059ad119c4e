"""Logical-axis rules: how the model's logical axis names map onto mesh axes, per parameter strategy (replicated,
zero1, fsdp); one rule list serves parameters and activations.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import BATCH_AXES

STRATEGIES = ("replicated", "zero1", "fsdp")

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def logical_rules(strategy: str = "replicated") -> Rules:
    """(logical name, mesh axes) pairs for `strategy`; names not listed are replicated.

    The model names every parameter dimension (`embed`, `heads`, `mlp`, `expert`, `vocab`, `layers`, ...) and every
    main activation (`batch`, `length`, `embed`, ...); a rule maps each name to the mesh axes that split it.
    Strategies for parameters and optimizer state:
      replicated   parameters and optimizer moments whole on every replica (experts still split over `expert`);
      zero1        parameters replicated, optimizer moments additionally split over the data-parallel axes
                   (ZeRO stage 1): each replica updates its slice, XLA gathers the new parameters;
      fsdp         parameters and moments split over `fsdp` (and `expert`) along `embed` (ZeRO-3 style: gathered
                   per use).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"sharding strategy {strategy!r} unknown; choose one of {', '.join(STRATEGIES)}")
    rules: list[tuple[str, tuple[str, ...]]] = [
        ("batch", BATCH_AXES),
        ("expert", ("expert",)),
        ("heads", ("tensor",)),
        ("mlp", ("tensor",)),
        ("vocab", ("tensor",)),
        ("layers", ("pipeline",)),      # a stacked layer axis splits into contiguous stage chunks
    ]
    if strategy == "fsdp":
        rules.append(("embed", ("fsdp", "expert")))   # dense parts over both axes; experts: E over expert, D over fsdp
    return tuple(rules)


def mesh_spec(logical_spec: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Rules,
              extra: Iterable[str] = ()) -> PartitionSpec:
    """The mesh PartitionSpec of an array with `shape` whose dimensions have the logical names `logical_spec`.

    A mesh axis splits at most one dimension: the first mesh axes not already taken by an earlier dimension of the
    same array, and that divide the dimension, are used, so one rule list serves parameters and activations. Axes in
    `extra` (e.g. the data axes for ZeRO-1 moments) then split the largest dimension they still divide.
    """
    table = dict(rules)
    names = tuple(logical_spec or ()) + (None,) * (len(shape) - len(tuple(logical_spec or ())))
    taken: set[str] = set()
    out: list[tuple[str, ...]] = []
    for name, size in zip(names, shape):
        axes = []
        for axis in table.get(name, ()) if name is not None else ():
            if axis in taken or mesh.shape.get(axis, 1) == 1:
                continue
            if size % (_product(mesh, axes) * mesh.shape[axis]) == 0:
                axes.append(axis)
                taken.add(axis)
        out.append(tuple(axes))
    for axis in extra:
        if axis in taken or mesh.shape.get(axis, 1) == 1:
            continue
        candidates = [i for i, size in enumerate(shape) if size % (_product(mesh, out[i]) * mesh.shape[axis]) == 0]
        if candidates:
            i = max(candidates, key=lambda i: shape[i] // _product(mesh, out[i]))
            out[i] = out[i] + (axis,)
            taken.add(axis)
    return PartitionSpec(*(_entry(axes) for axes in out))


def _product(mesh: Mesh, axes: Sequence[str]) -> int:
    n = 1
    for axis in axes:
        n *= mesh.shape[axis]
    return n


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def tree_shardings(logical_specs: Any, abstract: Any, mesh: Mesh, rules: Rules, extra: Iterable[str] = ()) -> Any:
    """NamedShardings for every leaf of `abstract` (arrays or ShapeDtypeStructs) from a matching tree of
    logical PartitionSpecs."""
    extra = tuple(extra)
    is_spec = lambda x: isinstance(x, PartitionSpec) or x is None
    return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, mesh_spec(spec, leaf.shape, mesh, rules, extra)),
                        logical_specs, abstract, is_leaf=is_spec)

