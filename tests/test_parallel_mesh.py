"""Mesh construction from config (data, fsdp[, tensor]; -1 = fill)."""

import jax
import pytest

from imagen_jax.parallel import mesh as mesh_lib


def test_resolve_fill_axis():
  assert mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {
      "data": 4,
      "fsdp": 2,
      "tensor": 1,
  }
  assert mesh_lib.resolve_mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4}


@pytest.mark.parametrize(
    "shape, match",
    [
        ({"data": -1, "fsdp": -1}, "more than one -1"),
        ({"data": -1, "fsdp": 3}, "not divisible"),
        ({"data": 2, "fsdp": 2}, "needs 4 devices"),
        ({"data": -1, "model": 2}, "'model' is not one of"),
        ({"data": 0, "fsdp": -1}, "size 0"),
    ],
)
def test_resolve_errors_name_the_bad_value(shape, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.resolve_mesh_shape(shape, 8)


def test_make_mesh_auto_axes_and_subset():
  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  one = mesh_lib.make_mesh({"data": -1, "fsdp": 1}, devices=jax.devices()[:1])
  assert one.devices.size == 1


def test_abstract_mesh_needs_no_devices():
  m = mesh_lib.abstract_mesh({"data": 16, "fsdp": 16, "tensor": 1}, 256)
  assert dict(m.shape) == {"data": 16, "fsdp": 16, "tensor": 1}
