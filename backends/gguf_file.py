"""A GGUF file's metadata and tensor index, read straight from the mapped file.

gguf.GGUFReader turns every element of every array field into numpy views before anything can be
read: ~4.8 s for the embedded model's 49k-token vocabulary on a 2-core host, on every engine start,
for fields the loaders never read (the tokenizer comes from its own cache, gateway/templating.py).
This walk keeps scalar and string fields, skips arrays by their byte size, and lists the tensors
with their bytes as numpy views shaped as GGUFReader shapes them (what gguf.quants.dequantize
takes): milliseconds.

The layout (GGUF v2 and v3, little-endian): magic, version, tensor count, field count; each field
a key, a value type and a value; each tensor a name, its dimensions (fastest first), its ggml type
and its offset in the data section, which starts at the next multiple of general.alignment.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np

# value types -> struct format of a scalar (8: string, 9: array are walked)
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                  12: "<d"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32
# ggml types stored as plain numbers (the others are blocks of bytes)
PLAIN_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]          # GGUF order: the fastest-varying dimension first
    tensor_type: int                # a gguf.GGMLQuantizationType value
    data: np.ndarray                # numbers [*reversed(shape)], or for block types bytes [..., row bytes]


class GGUFFile:
    """fields: every scalar and string field (arrays are skipped); tensors: TensorEntry in file
    order. The tensors' data are views of the mapped file: keep the GGUFFile while using them."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._read(path)
        except (struct.error, KeyError, UnicodeDecodeError) as error:      # cut short or not GGUF inside
            raise ValueError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from None

    def _read(self, path: str) -> None:
        buf = self._map
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or later)")
        self.path, self.version = path, version
        self.fields: dict[str, object] = {}
        pos = 24
        for _ in range(n_fields):
            key, pos = self._string(pos)
            (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            if kind == ARRAY:
                pos = self._skip_array(pos)
                continue
            value, pos = self._value(kind, pos)
            self.fields[key] = value
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            pos += 8 * n_dims
            kind, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, tuple(int(d) for d in dims), kind, offset))
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-pos // alignment) * alignment
        self.tensors = [TensorEntry(name, dims, kind, self._data(start + offset, dims, kind))
                        for name, dims, kind, offset in infos]

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._map, pos)
        return self._map[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

    def _value(self, kind: int, pos: int) -> tuple[object, int]:
        if kind == STRING:
            return self._string(pos)
        fmt = SCALAR_FORMATS[kind]
        return struct.unpack_from(fmt, self._map, pos)[0], pos + struct.calcsize(fmt)

    def _skip_array(self, pos: int) -> int:
        sub, count = struct.unpack_from("<IQ", self._map, pos)
        pos += 12
        if sub in SCALAR_FORMATS:
            return pos + count * struct.calcsize(SCALAR_FORMATS[sub])
        for _ in range(count):          # strings (or nested arrays): each carries its own length
            if sub == STRING:
                pos += 8 + struct.unpack_from("<Q", self._map, pos)[0]
            else:
                pos = self._skip_array(pos)
        return pos

    def _data(self, at: int, dims: tuple[int, ...], kind: int) -> np.ndarray:
        numbers = int(np.prod(dims))
        shape = tuple(reversed(dims))
        if kind in PLAIN_TYPES:
            return np.frombuffer(self._map, PLAIN_TYPES[kind], numbers, at).reshape(shape)
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # block sizes of the quantised types

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        assert dims[0] % block == 0, f"rows of {dims[0]} are not whole blocks of {block}"
        return np.frombuffer(self._map, np.uint8, numbers // block * size, at).reshape(
            *shape[:-1], dims[0] // block * size)
