"""Meshes from axis sizes: -1 fills, and sizes that do not fit name the axis. (Steps on meshes: test_rules.py.)"""

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
