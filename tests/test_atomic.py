"""imagen_jax.atomic: an interrupted write leaves nothing at the final path; no collisions."""

import os
import threading

import numpy as np
import pytest

from imagen_jax import atomic


class Boom(Exception):
  pass


def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
  path = str(tmp_path / "out.json")

  def half_write(tmp):
    with open(tmp, "w") as f:
      f.write('{"half":')
    raise Boom

  with pytest.raises(Boom):
    atomic.write_with(path, half_write)
  assert os.listdir(tmp_path) == []  # neither the final file nor a temporary
  atomic.write_json(path, {"a": 1})
  with pytest.raises(Boom):
    atomic.write_with(path, half_write)
  assert open(path).read() == '{\n  "a": 1\n}\n'  # the previous content, whole
  assert os.listdir(tmp_path) == ["out.json"]


def test_concurrent_writers_never_share_a_temporary(tmp_path):
  path = str(tmp_path / "x.txt")
  names, barrier = [], threading.Barrier(8)

  def write(tmp):
    names.append(tmp)
    barrier.wait()  # all 8 temporaries exist at once
    with open(tmp, "w") as f:
      f.write(os.path.basename(tmp))

  threads = [threading.Thread(target=atomic.write_with, args=(path, write)) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(set(names)) == 8 and all(os.path.dirname(n) == str(tmp_path) for n in names)
  assert open(path).read() in {os.path.basename(n) for n in names}  # one whole write won
  assert os.listdir(tmp_path) == ["x.txt"]


def test_npz_png_and_text(tmp_path):
  p = atomic.save_npz(str(tmp_path / "a.npz"), compressed=True, x=np.arange(3))
  with np.load(p) as z:
    np.testing.assert_array_equal(z["x"], [0, 1, 2])
  assert sorted(os.listdir(tmp_path)) == ["a.npz"]  # numpy appended no second extension
  png = atomic.save_png(str(tmp_path / "b.png"), np.zeros((4, 5, 1), np.uint8))
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="float32"):
    atomic.save_png(str(tmp_path / "c.png"), np.zeros((4, 4, 3), np.float32))
  assert atomic.write_text(str(tmp_path / "sub" / "t.txt"), "é") and (
      (tmp_path / "sub" / "t.txt").read_text(encoding="utf-8") == "é"
  )
  # The files get the mode a plain open() would give (not mkstemp's 0o600).
  plain = tmp_path / "plain.txt"
  plain.write_text("x")
  for name in ("a.npz", "b.png", "sub/t.txt"):
    assert os.stat(tmp_path / name).st_mode & 0o777 == plain.stat().st_mode & 0o777, name


def test_publish_dir(tmp_path):
  final = str(tmp_path / "point")
  with pytest.raises(Boom):
    with atomic.publish_dir(final) as tmp:
      atomic.write_text(os.path.join(tmp, "a"), "1")
      raise Boom
  assert os.listdir(tmp_path) == []
  with atomic.publish_dir(final) as tmp:
    atomic.write_text(os.path.join(tmp, "a"), "1")
    assert not os.path.exists(final)  # nothing visible before the block ends
  with atomic.publish_dir(final) as tmp:  # another writer got there first: keep theirs
    atomic.write_text(os.path.join(tmp, "a"), "2")
  assert open(os.path.join(final, "a")).read() == "1"
  with atomic.publish_dir(final, overwrite=True) as tmp:
    atomic.write_text(os.path.join(tmp, "a"), "3")
  assert open(os.path.join(final, "a")).read() == "3"
  assert os.listdir(tmp_path) == ["point"]
  fixed = str(tmp_path / "point.incomplete")
  os.makedirs(fixed)
  atomic.write_text(os.path.join(fixed, "stale"), "x")  # a killed writer's leftover
  with atomic.publish_dir(str(tmp_path / "other"), tmp=fixed) as tmp:
    assert tmp == fixed and os.listdir(tmp) == []
  assert sorted(os.listdir(tmp_path)) == ["other", "point"]
  with pytest.raises(ValueError, match="must be in the folder"):
    with atomic.publish_dir(final, tmp=str(tmp_path / "sub" / "x")):
      pass
