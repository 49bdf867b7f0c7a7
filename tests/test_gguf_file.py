"""backends/gguf_file.py against the gguf package's reader: the same scalar and string fields, and
the same tensors (names, types, shapes, bytes), for the embedded model and for a file with every
value type the format has (arrays of numbers and of strings skipped over, not misread)."""
import numpy as np
import pytest

from backends.gguf_file import GGUFFile
from gateway.config import parse_config
from gateway.local_model import resolve_source

gguf = pytest.importorskip("gguf")


def assert_same_as_gguf_reader(path: str) -> GGUFFile:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    scalars = {}
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):                     # the reader's own header entries
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            assert key not in ours.fields
            continue
        scalars[key] = field.contents()
    assert ours.fields == scalars
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, other in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == int(other.tensor_type)
        assert mine.shape == tuple(int(n) for n in other.shape)
        assert mine.data.shape == other.data.shape and mine.data.dtype == other.data.dtype
        assert np.array_equal(mine.data.view(np.uint8), other.data.view(np.uint8))
    return ours


def test_embedded_model_reads_as_the_gguf_package_reads_it():
    path = resolve_source(parse_config({}).models[0].source).path
    file = assert_same_as_gguf_reader(path)
    assert file.fields["general.architecture"] == "llama" and len(file.tensors) > 0
    assert isinstance(file.fields["tokenizer.chat_template"], str)


def test_every_value_type_and_array_is_walked(tmp_path):
    path = str(tmp_path / "types.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 7)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 700)
    writer.add_int16("t.i16", -700)
    writer.add_uint32("t.u32", 70000)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 0.5)
    writer.add_uint64("t.u64", 1 << 40)
    writer.add_int64("t.i64", -(1 << 40))
    writer.add_float64("t.f64", 0.25)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.strs", ["a", "bc", ""])
    writer.add_string("t.after", "read past the arrays")
    writer.add_tensor("w.f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("w.f16", np.ones((2, 8), dtype=np.float16))
    q = gguf.quants.quantize(np.linspace(-1, 1, 64 * 2, dtype=np.float32).reshape(2, 64),
                             gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("w.q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = assert_same_as_gguf_reader(path)
    assert file.fields["t.after"] == "read past the arrays" and file.fields["t.i64"] == -(1 << 40)
    q8 = next(t for t in file.tensors if t.name == "w.q8")
    np.testing.assert_allclose(gguf.quants.dequantize(q8.data, gguf.GGMLQuantizationType.Q8_0),
                               np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), atol=0.01)


def test_a_cut_short_or_foreign_file_is_a_value_error(tmp_path):
    path = resolve_source(parse_config({}).models[0].source).path
    with open(path, "rb") as f:
        head = f.read(4096)
    for name, data in (("cut.gguf", head), ("foreign.gguf", b"PK\x03\x04" + head[4:])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="GGUF"):
            GGUFFile(str(tmp_path / name))
