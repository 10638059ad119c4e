"""jax_compat: every entry still fits the installed JAX and orbax (a failure names the private API it leans on and
both versions), a moved API is reported that way, and the orbax handler writes lazy leaves whole and in pieces."""

from __future__ import annotations

import dataclasses

import numpy as np
import orbax.checkpoint as ocp
import pytest

import jax_compat


@pytest.mark.parametrize("name", sorted(jax_compat.ENTRIES))
def test_entry_fits_the_installed_versions(name):
    entry = jax_compat.ENTRIES[name]
    try:
        entry.probe()
    except jax_compat.PrivateAPIError as e:
        pytest.fail(f"jax_compat entry {name!r} (relies on {entry.api}) no longer fits: {e}", pytrace=False)


def test_moved_module_is_named_with_the_versions(monkeypatch):
    monkeypatch.setattr(jax_compat, "_CUDNN_MODULE", "jax._src.cudnn.moved_away")
    with pytest.raises(jax_compat.PrivateAPIError) as caught:
        jax_compat.ENTRIES["cudnn_attention"].probe()
    message = str(caught.value)
    assert message.startswith("jax._src.cudnn.moved_away: cannot be imported")
    assert jax_compat.versions() in message and "orbax-checkpoint" in message and "\n" not in message


def test_changed_callback_signature_is_named(monkeypatch):
    callbacks = jax_compat._interpreter().callbacks
    monkeypatch.setattr(callbacks, "wgmma", lambda *, token, device_id, a_ref, b_ref: token)
    with pytest.raises(jax_compat.PrivateAPIError, match=r"gpu_callbacks\.wgmma: takes \(token, device_id, a_ref"):
        jax_compat.ENTRIES["gpu_interpreter"].probe()


@dataclasses.dataclass(frozen=True, eq=False)
class Leaf:
    """The leaf protocol of register_lazy_leaf_handler; counts how it was built."""

    values: np.ndarray
    sliced: bool
    calls: list = dataclasses.field(default_factory=list)

    shape = property(lambda self: self.values.shape)
    dtype = property(lambda self: self.values.dtype)
    piece_bytes = property(lambda self: self.values[0].nbytes)
    piece_axes = 1

    def produce(self) -> np.ndarray:
        self.calls.append("whole")
        return self.values

    def parts(self):
        self.calls.append("parts")
        return ((i, row) for i, row in enumerate(self.values))


def test_lazy_leaves_are_written_whole_or_in_pieces(tmp_path):
    jax_compat.register_lazy_leaf_handler(Leaf)
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    whole, pieces = Leaf(values, sliced=False), Leaf(values * 2, sliced=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "tree", args=ocp.args.PyTreeSave({"whole": whole, "pieces": pieces}))
        restored = checkpointer.restore(tmp_path / "tree")
    assert (whole.calls, pieces.calls) == (["whole"], ["parts"])
    np.testing.assert_array_equal(restored["whole"], values)
    np.testing.assert_array_equal(restored["pieces"], values * 2)
