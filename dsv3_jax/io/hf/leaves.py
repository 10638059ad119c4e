"""Our variables addressed leaf by leaf: a leaf is `(collection, *path)`, e.g. ('params', 'embed', 'embedding'),
and `leaf_specs` gives each one's shape and dtype for a config without building anything."""

from __future__ import annotations

import functools
from typing import Any, Iterator

import jax

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import init_variables


@functools.lru_cache(maxsize=8)
def leaf_specs(config: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Shape and dtype of each of our variables, keyed by (collection, *path)."""
    abstract = jax.eval_shape(functools.partial(init_variables, config), jax.random.PRNGKey(0))
    return dict(flatten(abstract))


def flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(leaf, value) of every array of a nested dict (or mapping) tree."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for key, value in tree.items():
            yield from flatten(value, prefix + (str(key),))
    else:
        yield prefix, tree


def set_leaf(tree: dict, leaf: tuple[str, ...], value: Any) -> None:
    for key in leaf[:-1]:
        tree = tree.setdefault(key, {})
    tree[leaf[-1]] = value


def get_leaf(tree: Any, leaf: tuple[str, ...]) -> Any:
    for key in leaf:
        tree = tree[key]
    return tree
