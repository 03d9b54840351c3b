"""TensorBoard event files, written without TensorFlow, torch or tensorboardX.

An event file is a sequence of TFRecords, each holding one serialized
`tensorboard.Event` protobuf. Only the few fields training logs need are
encoded here (field numbers from tensorboard's event.proto / summary.proto):

  Event       1 wall_time (double)   2 step (int64)   3 file_version (string)
              5 summary (Summary)    7 session_log (SessionLog)
  Summary     1 value (repeated Value)
  Value       1 tag (string)         2 simple_value (float, in a oneof:
                                                        written even when 0)
  SessionLog  1 status (enum: START = 1)

TFRecord framing: length (u64 little-endian), masked CRC-32C of the length
bytes (u32), payload, masked CRC-32C of the payload (u32); the mask is
((crc >> 15 | crc << 17) + 0xa282ead8) mod 2^32.

Importing tensorboardX for this pulled in torch whenever torch was installed
(2.6 s and ~300 MB per training process); this module needs the standard
library only. tests/test_launch_train.py reads the files back with
tensorboardX's protobuf classes and checks the bytes against them.
"""

from __future__ import annotations

import struct

SESSION_START = 1


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1   # Castagnoli, reflected
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1          # negative int64s as two's complement, as protobuf does
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, file_version: str | None = None,
                 scalars: dict[str, float] | None = None,
                 session_status: int | None = None) -> bytes:
  """One serialized Event; fields in field-number order, defaults omitted
  (as protobuf's own serializer writes them)."""
  out = _key(1, 1) + struct.pack("<d", wall_time)
  if step:
    out += _key(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", v))
        for tag, v in scalars.items())
    out += _bytes_field(5, values)
  if session_status is not None:
    out += _bytes_field(7, _key(1, 0) + _varint(session_status))
  return out


def record(payload: bytes) -> bytes:
  """payload framed as one TFRecord."""
  length = struct.pack("<Q", len(payload))
  return (length + struct.pack("<I", masked_crc(length)) + payload
          + struct.pack("<I", masked_crc(payload)))
