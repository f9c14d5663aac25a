"""The TensorBoard writer: one event file per program, opened at its first scalar, on process 0."""

import os
import pathlib
import struct

from tensorboardX.proto import event_pb2

from cma_jax import tb


def scalars(path) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every scalar in an event file (TFRecord framing: length, crc, data, crc)."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        out += [(v.tag, v.simple_value, event.step) for v in event.summary.value]
        i += 12 + n + 4
    return out


def tb_scalars(workdir, tag) -> list[float]:
    """The values of one scalar tag in a run's TensorBoard event file (WORKDIR/tb holds one)."""
    (events,) = os.listdir(os.path.join(workdir, "tb"))
    return [v for t, v, _ in scalars(pathlib.Path(workdir, "tb", events)) if t == tag]


def test_one_event_file_opened_at_the_first_scalar(tmp_path):
    writer = tb.open_writer(str(tmp_path))
    assert not (tmp_path / "tb").exists()  # a run refused by the lock leaves nothing behind
    writer.add_scalar("train/loss", 2.5, 1)
    writer.add_scalar("test/t2v_R1", 40.0, 1)
    writer.close()
    files = os.listdir(tmp_path / "tb")
    assert len(files) == 1 and files[0].startswith("events")
    assert scalars(tmp_path / "tb" / files[0]) == [("train/loss", 2.5, 1), ("test/t2v_R1", 40.0, 1)]


def test_a_writer_never_opened_closes_without_a_file(tmp_path):
    writer = tb.open_writer(str(tmp_path))
    writer.flush()
    writer.close()
    assert not (tmp_path / "tb").exists()
