"""Meshes from axis sizes: -1 fills, and sizes that do not fit name the axis. (Steps on meshes: test_rules.py.)"""

import numpy as np
import pytest

from sharding.mesh import MESH_AXES, MeshError, resolve_axis_sizes


def test_minus_one_takes_the_remaining_devices():
    assert resolve_axis_sizes({"data": -1, "expert": 4}, 32) == dict(data=8, fsdp=1, expert=4, pipeline=1, tensor=1)
    assert resolve_axis_sizes({}, 1) == {axis: 1 for axis in MESH_AXES}


@pytest.mark.parametrize("sizes, devices, field", [
    ({"data": 3}, 8, "mesh:"),
    ({"data": -1, "expert": 3}, 8, "mesh.data=-1"),
    ({"data": -1, "fsdp": -1}, 8, "mesh.fsdp=-1"),
    ({"expert": 0}, 8, "mesh.expert=0"),
    ({"experts": 2}, 8, "mesh.experts"),
])
def test_sizes_that_do_not_fit_name_the_axis(sizes, devices, field):
    with pytest.raises(MeshError, match=field.replace(".", r"\.")):
        resolve_axis_sizes(sizes, devices)


def _mesh_of(hosts_along_expert, platform="gpu", data=2):
    """A mesh-like record (what expert_node_size reads): `data` × expert devices, device e on host hosts[e]."""
    from types import SimpleNamespace

    expert = len(hosts_along_expert)
    grid = np.array([[SimpleNamespace(process_index=h, slice_index=h, platform=platform) for h in hosts_along_expert]
                     for _ in range(data)], dtype=object)
    return SimpleNamespace(shape={"data": data, "expert": expert}, devices=grid, axis_names=("data", "expert"))


def test_expert_node_size_from_the_devices():
    """Ranks of the expert axis per node: read from hosts (GPUs) or slices (TPUs, the DCN boundary); a request
    overrides; nodes that are not equal contiguous blocks make every rank its own node."""
    from sharding.mesh import expert_node_size

    assert expert_node_size(_mesh_of([0] * 8 + [1] * 8)) == 8
    assert expert_node_size(_mesh_of([0] * 8)) == 8                              # one node
    assert expert_node_size(_mesh_of([0, 0, 1, 1, 0, 0, 1, 1])) == 1              # a host in two places
    assert expert_node_size(_mesh_of([0] * 4 + [1] * 4, platform="tpu")) == 4     # two slices
    assert expert_node_size(_mesh_of([0] * 16), requested=4) == 4
    with pytest.raises(ValueError, match="mesh.expert_node_size=3: must divide mesh.expert=16"):
        expert_node_size(_mesh_of([0] * 16), requested=3)
