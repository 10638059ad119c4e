"""Collectives of a compiled program priced on a chip's links: the devices of each group (explicit, iota and
mesh-axes replica groups; source-target pairs), the bytes each device sends by the algorithm, and the time they take
over NVLink, InfiniBand or ICI (experiments.hardware)."""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from experiments.hardware import Chip
from experiments.hlo_module import Computation, Instruction, ints, split_top_level

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# HLO opcode (its `-start` form too) -> the kind it is priced as.
OPCODES = {**{kind: kind for kind in KINDS}, "ragged-all-to-all": "all-to-all"}


def collective_kind(opcode: str) -> str | None:
    """The kind of a collective opcode ('all-gather-start' -> 'all-gather'); None for anything else."""
    return OPCODES.get(opcode.removesuffix("-start"))


# ---------------------------------------------------------------------------------------------------------------
# Who is in each group


def _iota(dims: list[int], reshape: list[int] | None = None, perm: list[int] | None = None) -> np.ndarray:
    """iota(prod(reshape)).reshape(reshape).transpose(perm), reshaped to `dims` (XLA's iota tile assignment)."""
    reshape = reshape or dims
    ids = np.arange(int(np.prod(reshape))).reshape(reshape)
    if perm:
        ids = ids.transpose(perm)
    return ids.reshape(dims)


_IOTA = re.compile(r"^\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?$")


@functools.lru_cache(maxsize=None)
def parse_replica_groups(text: str | None, n_partitions: int, device_ids: str | None = None) -> tuple:
    """The groups (tuples of partition ids) of a `replica_groups` attribute in any of its printed forms:
    explicit `{{0,1},{2,3}}`; iota `[2,4]<=[8]`, `[4,2]<=[2,4]T(1,0)`; mesh axes
    `mesh['a'=2,'b'=4] {'b'}` (with `device_ids=([2,4]T(1,0))` when the mesh's devices are not in order, and
    sub-axes `'b':(1)2`). Absent or `{}`: one group of every partition."""
    text = (text or "").strip()
    if text.startswith("mesh["):
        return _mesh_groups(text, device_ids)
    if not text or text == "{}":
        return (tuple(range(n_partitions)),)
    m = _IOTA.match(text)
    if m:
        dims = ints(m.group(1))
        reshape = ints(m.group(2)) if m.group(2) else None
        perm = ints(m.group(3)) if m.group(3) else None
        return tuple(tuple(int(x) for x in row) for row in _iota(dims, reshape, perm).reshape(dims[0], -1))
    if text.startswith("{"):
        return tuple(tuple(ints(group)) for group in split_top_level(text[1:-1]))
    raise ValueError(f"replica_groups: unknown form {text!r}")


def _mesh_groups(text: str, device_ids: str | None) -> tuple:
    axes = re.search(r"mesh\[([^\]]*)\]", text).group(1)
    names = re.findall(r"'([^']+)'\s*=\s*\d+", axes)
    sizes = [int(s) for s in re.findall(r"'[^']+'\s*=\s*(\d+)", axes)]
    tail = text if device_ids is None else device_ids
    grouped = re.search(r"\{([^{}]*)\}\s*$", tail)
    refs = re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", grouped.group(1)) if grouped else []
    n = int(np.prod(sizes))
    ids = np.arange(n)
    if device_ids is not None:
        spec = device_ids[:device_ids.rfind("{")].strip() if grouped else device_ids.strip()
        spec = spec[1:-1].strip() if spec.startswith("(") else spec
        m = _IOTA.match(spec)
        if m:   # `[2,4]T(1,0)`: iota over those dims, transposed; `[8]<=[2,4]T(1,0)` likewise
            reshape = ints(m.group(2)) if m.group(2) else ints(m.group(1))
            perm = ints(m.group(3)) if m.group(3) else None
            ids = _iota([n], reshape, perm)
        else:
            ids = np.asarray(ints(spec))
    # Each mesh axis becomes one or more dimensions: its grouped sub-axes (by pre-size) and the parts between them.
    dims = []
    for axis, (name, size) in enumerate(zip(names, sizes)):
        on_axis = [(int(pre) if pre else 1, int(sub) if sub else size, i) for i, (ref, pre, sub) in enumerate(refs)
                   if ref == name]
        if not on_axis:
            dims.append((size, None))
            continue
        product = 1
        for pre, sub, order in sorted(on_axis):
            if pre != product:
                dims.append((pre // product, None))
                product = pre
            dims.append((sub, order))
            product *= sub
        if product != size:
            dims.append((size // product, None))
    shape = [size for size, _ in dims]
    free = [d for d, (_, order) in enumerate(dims) if order is None]
    chosen = sorted((order, d) for d, (_, order) in enumerate(dims) if order is not None)
    group_size = int(np.prod([dims[d][0] for _, d in chosen])) if chosen else 1
    arranged = ids.reshape(shape).transpose(free + [d for _, d in chosen]).reshape(-1, group_size)
    return tuple(tuple(int(x) for x in row) for row in arranged)


@functools.lru_cache(maxsize=None)
def parse_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """`source_target_pairs={{0,1},{1,2}}` -> ((0, 1), (1, 2))."""
    return tuple((pair[0], pair[1]) for pair in (ints(p) for p in split_top_level(text.strip()[1:-1])) if pair)


# ---------------------------------------------------------------------------------------------------------------
# What a collective costs


@dataclasses.dataclass(frozen=True)
class Links:
    """The chip and where each partition of the program sits: `nodes[p]` is partition p's node (GPUs, whose nodes
    talk over InfiniBand), or None where every device shares one domain (a TPU slice's ICI)."""
    chip: Chip
    nodes: tuple[int, ...] | None = None

    def node(self, partition: int) -> int:
        return 0 if self.nodes is None else self.nodes[partition]


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One collective: what it is, the bytes each device sends (the largest over its groups), of those the bytes
    that leave the device's node (over the scale-out link: its slowest group's), and its seconds."""
    kind: str
    bytes_sent: float
    seconds: float
    group_size: int
    crosses_nodes: bool
    bytes_internode: float = 0.0


def _seconds(local: float, remote: float, links: Links) -> float:
    """NVLink (or ICI) and InfiniBand carry their shares at the same time: the slower one sets the time."""
    chip = links.chip
    out_rate = chip.scale_out_bytes_per_s or chip.scale_up_bytes_per_s
    return max(local / chip.scale_up_bytes_per_s, remote / out_rate)


def ring_bytes(kind: str, operand_bytes: float, n: int) -> float:
    """Bytes each device sends in a ring (or pairwise) algorithm over n devices, from the bytes of its operands:
    all-gather (n−1)/n of the gathered result = (n−1) × its shard; reduce-scatter (n−1)/n of its full input;
    all-reduce 2(n−1)/n; all-to-all (n−1)/n of its buffer (one chunk stays); collective-permute the buffer."""
    if n <= 1 and kind != "collective-permute":
        return 0.0
    return {"all-gather": (n - 1) * operand_bytes, "reduce-scatter": (n - 1) / n * operand_bytes,
            "all-reduce": 2 * (n - 1) / n * operand_bytes, "all-to-all": (n - 1) / n * operand_bytes,
            "collective-permute": operand_bytes}[kind]


def price_groups(kind: str, operand_bytes: float, groups: tuple, links: Links) -> Transfer:
    """A collective over `groups` (tuples of partition ids), the slowest group setting the time.

    Inside one node (or a TPU slice) the bytes go over the chip's scale-up link. A group spanning nodes: a ring
    (all-gather, reduce-scatter, all-reduce) runs as k rings side by side, k the group's devices per node (fewest
    on any node), each leaving the node through a different device's NIC, so each device sends 1/k of the ring's
    bytes over InfiniBand and the rest over NVLink; an all-to-all sends each device's chunks for other nodes over
    its own NIC and the rest over NVLink."""
    worst = Transfer(kind, 0.0, 0.0, max((len(g) for g in groups), default=1), False)
    for group in groups:
        n = len(group)
        sent = ring_bytes(kind, operand_bytes, n)
        per_node: dict[int, int] = {}
        for p in group:
            per_node[links.node(p)] = per_node.get(links.node(p), 0) + 1
        crosses = len(per_node) > 1
        if not crosses or sent == 0:
            seconds, remote = _seconds(sent, 0.0, links), 0.0
        elif kind == "all-to-all":
            seconds, remote = max((_seconds((k - 1) / n * operand_bytes, (n - k) / n * operand_bytes, links),
                                   (n - k) / n * operand_bytes) for k in per_node.values())
        else:
            k = min(per_node.values())
            seconds, remote = _seconds(sent * (k - 1) / k, sent / k, links), sent / k
        if seconds >= worst.seconds:
            worst = Transfer(kind, max(sent, worst.bytes_sent), seconds, n, crosses or worst.crosses_nodes, remote)
    return worst


def price_local(kind: str, operand_bytes: float, n: int, links: Links) -> Transfer:
    """A collective among n devices of one node (or TPU slice): every byte over the scale-up link."""
    sent = ring_bytes(kind, operand_bytes, n)
    return Transfer(kind, sent, _seconds(sent, 0.0, links), n, False)


def price_pairs(operand_bytes: float, pairs: tuple, links: Links) -> Transfer:
    """A collective-permute: each source sends its buffer to its target, across nodes over InfiniBand."""
    local: dict[int, float] = {}
    remote: dict[int, float] = {}
    for source, target in pairs:
        if source == target:
            continue
        bucket = remote if links.node(source) != links.node(target) else local
        bucket[source] = bucket.get(source, 0.0) + operand_bytes
    sources = set(local) | set(remote)
    if not sources:
        return Transfer("collective-permute", 0.0, 0.0, 1, False)
    seconds = max(_seconds(local.get(s, 0.0), remote.get(s, 0.0), links) for s in sources)
    sent = max(local.get(s, 0.0) + remote.get(s, 0.0) for s in sources)
    return Transfer("collective-permute", sent, seconds, 2, bool(remote), max(remote.values(), default=0.0))


def collective_operand_bytes(kind: str, instruction: Instruction, computation: Computation) -> float:
    """The bytes a collective's device contributes: its operands' (a combined collective has several), a
    collective-permute's first operand (the in-place form also passes its output buffer and offsets)."""
    operands = [computation.by_name[name] for name in instruction.operands if name in computation.by_name]
    if kind == "collective-permute":
        operands = operands[:1]
    return sum(o.nbytes for o in operands)


def transfer(instruction: Instruction, computation: Computation, links: Links, n_partitions: int) -> Transfer:
    """The Transfer of a collective instruction (its `-start` form included)."""
    kind = collective_kind(instruction.opcode)
    size = collective_operand_bytes(kind, instruction, computation)
    pairs = instruction.attribute("source_target_pairs")
    if kind == "collective-permute" and pairs is not None:
        return price_pairs(size, parse_pairs(pairs), links)
    groups = parse_replica_groups(instruction.attribute("replica_groups"), n_partitions,
                                  instruction.attribute("device_ids"))
    return price_groups(kind, size, groups, links)
