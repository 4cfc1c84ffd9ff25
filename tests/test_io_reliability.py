"""The strict safetensors layer: every structural rule checked, peers' files read exactly.

Bad files are refused by :class:`SafetensorsFile` itself with a :class:`LoraError` whose
``file`` is the path and whose ``key`` is the offending tensor where there is one. Good files
written by the reference ``safetensors`` package (through torch, for bf16 and float8) are read
bit-exactly through NumPy and ml_dtypes.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import portable_lora as pl
from portable_lora import LoraError
from portable_lora.io.safetensors_io import (MAX_HEADER_BYTES, LazyTensor, SafetensorsFile,
                                             read_safetensors, write_safetensors)


def header_and_data(tensors: dict[str, np.ndarray], metadata=None) -> tuple[dict, bytes]:
    header: dict = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        dtype = {"float32": "F32", "float16": "F16", "int32": "I32"}[array.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


def pack(header: dict | str | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else (
        header if isinstance(header, str) else json.dumps(header)).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + data


TENSORS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}


def _refused(tmp_path: Path, raw: bytes, key: str | None = None, match: str | None = None) -> LoraError:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(LoraError, match=match) as info:
        SafetensorsFile(path)
    assert info.value.file == str(path)
    if key is not None:
        assert info.value.key == key
    with pytest.raises(LoraError):
        read_safetensors(path)
    return info.value


def _entry(field: str, value, name: str = "a") -> bytes:
    header, data = header_and_data(TENSORS)
    header[name][field] = value
    return pack(header, data)


def test_the_builders_make_a_valid_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(pack(*header_and_data(TENSORS, {"k": "v"})))
    tensors, metadata = read_safetensors(path)
    assert metadata == {"k": "v"}
    np.testing.assert_array_equal(tensors["a"], TENSORS["a"])
    np.testing.assert_array_equal(tensors["b"], TENSORS["b"])


@pytest.mark.parametrize("cut", [0, 3, 7])
def test_truncated_in_the_length_prefix(tmp_path, cut):
    raw = pack(*header_and_data(TENSORS))
    _refused(tmp_path, raw[:cut], match="8-byte header length prefix")


def test_truncated_in_the_header_and_in_the_data(tmp_path):
    raw = pack(*header_and_data(TENSORS))
    _refused(tmp_path, raw[:20], match="truncated")
    exc = _refused(tmp_path, raw[:-1], match="truncated")
    assert exc.key == "b"  # the last tensor is the one cut short


def test_header_length_past_the_end_and_over_the_cap(tmp_path):
    header, data = header_and_data(TENSORS)
    body = json.dumps(header).encode()
    _refused(tmp_path, struct.pack("<Q", len(body) + len(data) + 1) + body + data, match="truncated")
    _refused(tmp_path, struct.pack("<Q", MAX_HEADER_BYTES + 1) + body + data, match="cap")
    _refused(tmp_path, struct.pack("<Q", 2 ** 64 - 1) + body + data, match="cap")


def test_overlapping_and_gapped_offsets(tmp_path):
    header, data = header_and_data(TENSORS)
    header["b"]["data_offsets"] = [20, 28]  # a ends at 24
    _refused(tmp_path, pack(header, data[:28]), key="b", match="overlap")
    header["b"]["data_offsets"] = [28, 36]
    _refused(tmp_path, pack(header, data[:24] + b"\0" * 4 + data[24:]), key="b", match="gap")
    header["a"]["data_offsets"] = [8, 32]  # a gap before the first tensor
    header["b"]["data_offsets"] = [32, 40]
    _refused(tmp_path, pack(header, b"\0" * 8 + data), key="a", match="gap")


def test_repeated_tensor_name_refused_where_the_reference_accepts_it(tmp_path):
    header, data = header_and_data({"a": TENSORS["a"]})
    entry = json.dumps(header["a"])
    raw = pack(f'{{"a": {entry}, "a": {entry}}}', data)
    path = tmp_path / "dup.safetensors"
    path.write_bytes(raw)
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    assert list(safetensors_numpy.load_file(path)) == ["a"]  # the peer silently accepts it
    _refused(tmp_path, raw, key="a", match="more than once")


def test_repeated_metadata_key_refused(tmp_path):
    header, data = header_and_data(TENSORS)
    text = json.dumps(header)
    raw = pack('{"__metadata__": {"alpha": "1", "alpha": "8"}, ' + text[1:], data)
    _refused(tmp_path, raw, key="alpha", match="more than once")


def test_repeated_field_inside_an_entry_refused(tmp_path):
    header, data = header_and_data({"a": TENSORS["a"]})
    entry = json.dumps(header["a"])
    raw = pack('{"a": ' + entry[:-1] + ', "dtype": "F16"}}', data)
    _refused(tmp_path, raw, key="dtype", match="more than once")


def test_null_metadata_is_read_as_empty(tmp_path):
    """mlx's save_safetensors writes ``"__metadata__": null``."""
    header, data = header_and_data(TENSORS)
    path = tmp_path / "null.safetensors"
    path.write_bytes(pack({"__metadata__": None, **header}, data))
    tensors, metadata = read_safetensors(path)
    assert metadata == {} and sorted(tensors) == ["a", "b"]


def test_file_that_changes_size_while_opened_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "growing.safetensors"
    path.write_bytes(pack(*header_and_data(TENSORS)))
    real_mmap = mmap.mmap

    def grow_then_map(fileno, length, *args, **kwargs):
        with open(path, "ab") as f:  # another program appends between validation and mapping
            f.write(b"\0" * 16)
        return real_mmap(fileno, length, *args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", grow_then_map)
    with pytest.raises(LoraError, match="changed size") as info:
        SafetensorsFile(path)
    assert info.value.file == str(path)


def test_tensor_named_metadata(tmp_path):
    header, data = header_and_data({"__metadata__": TENSORS["a"]})
    _refused(tmp_path, pack(header, data), key="__metadata__")
    with pytest.raises(LoraError, match="__metadata__") as info:
        write_safetensors(tmp_path / "w.safetensors", {"__metadata__": TENSORS["a"]})
    assert info.value.file == str(tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


def test_trailing_garbage(tmp_path):
    _refused(tmp_path, pack(*header_and_data(TENSORS)) + b"\0", match="after the last tensor")


def test_non_utf8_and_non_object_headers(tmp_path):
    _refused(tmp_path, pack(b'{"\xff": 1}', b""), match="not UTF-8")
    _refused(tmp_path, pack("[]", b""), match="JSON object")
    _refused(tmp_path, pack("null", b""), match="JSON object")
    _refused(tmp_path, pack('{"a": ', b""), match="not valid JSON")
    _refused(tmp_path, pack("[" * 100_000 + "]" * 100_000, b""), match="not valid JSON")


@pytest.mark.parametrize("dtype", ["F33", "f32", "", None, 5, ["F32"]])
def test_unknown_dtype(tmp_path, dtype):
    _refused(tmp_path, _entry("dtype", dtype), key="a", match="unknown dtype")


@pytest.mark.parametrize("shape", [[-2, 3], [True, 6], [2.0, 3], ["2", 3], 6, None, [[2], 3]])
def test_bad_shape(tmp_path, shape):
    _refused(tmp_path, _entry("shape", shape), key="a", match="shape")


@pytest.mark.parametrize("shape", [[1] * 65, [0] + [1] * 64, [0, 2 ** 63], [2 ** 40, 2 ** 40, 0]],
                         ids=["65-dims", "65-dims-empty", "empty-2**63", "empty-2**80"])
def test_shapes_no_array_can_have_are_refused_even_when_empty(tmp_path, shape):
    header, data = header_and_data({"x": np.zeros(0, np.float32), **TENSORS})
    header["x"]["shape"] = shape  # zero elements: the offsets still agree
    _refused(tmp_path, pack(header, data), key="x", match="dimensions|2\\*\\*62")


@pytest.mark.parametrize("where", ["name", "metadata"])
def test_unpaired_surrogates_are_refused_as_the_reference_does(tmp_path, where):
    header, data = header_and_data(TENSORS, metadata={"k": "v"})
    text = json.dumps(header)
    text = text.replace('"a"', '"a\\ud800"') if where == "name" else text.replace('"v"', '"\\udc00"')
    err = _refused(tmp_path, pack(text, data), match="surrogate")
    assert err.key == ("a\\ud800" if where == "name" else "__metadata__")


def test_big_endian_arrays_are_written_as_the_reference_writes_them(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {"f": np.arange(6, dtype=">f4").reshape(2, 3), "i": np.arange(3, dtype=">i8"),
               "h": np.array([1.5, -2.0], dtype=">f2")}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    safetensors_numpy.save_file(tensors, str(tmp_path / "ref.safetensors"))
    ours, ref = read_safetensors(tmp_path / "ours.safetensors")[0], safetensors_numpy.load_file(str(tmp_path / "ref.safetensors"))
    for k, v in tensors.items():
        assert ours[k].dtype == v.dtype.newbyteorder("=") and np.array_equal(ours[k], v) and np.array_equal(ref[k], v)


def test_file_range_of_an_unknown_tensor_names_it(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(pack(*header_and_data(TENSORS)))
    with SafetensorsFile(path) as f, pytest.raises(LoraError, match="no such tensor") as info:
        f.file_range("zz")
    assert info.value.key == "zz" and info.value.file == str(path)


@pytest.mark.parametrize("offsets", [[0], [0, 24, 24], [-1, 23], [24, 0], [0.0, 24.0], [False, 24], "0,24"])
def test_bad_offsets(tmp_path, offsets):
    _refused(tmp_path, _entry("data_offsets", offsets), key="a", match="data_offsets")


def test_entry_with_missing_or_extra_fields(tmp_path):
    header, data = header_and_data(TENSORS)
    del header["a"]["shape"]
    _refused(tmp_path, pack(header, data), key="a", match="exactly dtype, shape and data_offsets")
    header, data = header_and_data(TENSORS)
    header["a"]["loader"] = "os.system"
    _refused(tmp_path, pack(header, data), key="a", match="exactly dtype, shape and data_offsets")


def test_missing_and_unreadable_files_are_lora_errors(tmp_path):
    with pytest.raises(LoraError) as info:
        SafetensorsFile(tmp_path / "absent.safetensors")
    assert info.value.file == str(tmp_path / "absent.safetensors")
    with pytest.raises(LoraError):
        SafetensorsFile(tmp_path)  # a directory


# -- dtypes read through NumPy ---------------------------------------------------------------------
def test_bf16_and_float8_written_by_the_reference_read_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(0)
    source = {
        "bf16": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
        "f8_e4m3": (torch.randn(4, 4, generator=gen) * 8).to(torch.float8_e4m3fn),
        "f8_e5m2": (torch.randn(7, generator=gen) * 100).to(torch.float8_e5m2),
        "f16": torch.randn(2, 2, generator=gen).to(torch.float16),
    }
    path = tmp_path / "peer.safetensors"
    safetensors_torch.save_file(source, str(path), metadata={"who": "reference"})
    tensors, metadata = read_safetensors(path)
    assert metadata == {"who": "reference"}
    expected_dtypes = {"bf16": ml_dtypes.bfloat16, "f8_e4m3": ml_dtypes.float8_e4m3fn,
                       "f8_e5m2": ml_dtypes.float8_e5m2, "f16": np.float16}
    for name, tensor in source.items():
        ours = tensors[name]
        assert ours.dtype == np.dtype(expected_dtypes[name]) and ours.shape == tuple(tensor.shape)
        np.testing.assert_array_equal(ours.astype(np.float32), tensor.float().numpy())
        assert ours.tobytes() == tensor.view(torch.uint8).numpy().tobytes()
    # and the reference reads what we write back, bit for bit
    write_safetensors(tmp_path / "ours.safetensors", tensors, metadata)
    back = safetensors_torch.load_file(str(tmp_path / "ours.safetensors"))
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8))


def test_float8_factors_are_refused_by_the_portable_format_naming_the_module(tmp_path):
    """F8 reads fine at the file layer; an adapter factor must be F16/BF16/F32/F64 (FORMAT.md)."""
    adapter = pl.examples.random_adapter({"m": (4, 3)}, rank=2)
    path = tmp_path / "a.safetensors"
    pl.save(adapter, path)
    with SafetensorsFile(path) as f:
        tensors = {k: f.get(k) for k in f.keys()}
        metadata = dict(f.metadata)
    tensors["m.lora_A"] = tensors["m.lora_A"].astype(ml_dtypes.float8_e4m3fn)
    write_safetensors(path, tensors, metadata)
    assert read_safetensors(path)[0]["m.lora_A"].dtype == ml_dtypes.float8_e4m3fn
    with pytest.raises(LoraError, match="floating point") as info:
        pl.load(path)
    assert info.value.file == str(path) and info.value.key == "m"


def test_nonfinite_values_read_unchanged(tmp_path):
    values = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)
    write_safetensors(tmp_path / "n.safetensors", {"x": values, "y": values.astype(ml_dtypes.bfloat16)})
    tensors, _ = read_safetensors(tmp_path / "n.safetensors")
    assert tensors["x"].tobytes() == values.tobytes()
    assert tensors["y"].tobytes() == values.astype(ml_dtypes.bfloat16).tobytes()


def test_empty_tensors_and_empty_files(tmp_path):
    write_safetensors(tmp_path / "e.safetensors", {"z": np.zeros((0, 3), np.float32), "a": TENSORS["a"]})
    tensors, _ = read_safetensors(tmp_path / "e.safetensors")
    assert tensors["z"].shape == (0, 3)
    np.testing.assert_array_equal(tensors["a"], TENSORS["a"])
    write_safetensors(tmp_path / "none.safetensors", {})
    assert read_safetensors(tmp_path / "none.safetensors") == ({}, {})


def test_views_are_read_only(tmp_path):
    write_safetensors(tmp_path / "v.safetensors", TENSORS)
    with SafetensorsFile(tmp_path / "v.safetensors") as f:
        view = f.get("a", copy=False)
        with pytest.raises(ValueError):
            view[0, 0] = 1.0


# -- the writer refuses what it could not write faithfully ---------------------------------------------
@pytest.mark.parametrize("tensors, metadata, key", [
    ({"bad\udc80": TENSORS["a"]}, None, "bad\udc80"),
    ({"a": TENSORS["a"]}, {"k\ud800": "v"}, "k\ud800"),
    ({"a": TENSORS["a"]}, {"k": "v\ud800"}, "v\ud800"),
    ({"a": TENSORS["a"]}, {"k": 1}, "__metadata__"),
    ({1: TENSORS["a"]}, None, None),
    ({"c": np.ones(2, np.complex64)}, None, "c"),
    ({"o": np.array(["x"], object)}, None, "o"),
], ids=["surrogate-name", "surrogate-metadata-key", "surrogate-metadata-value", "non-string-metadata",
        "integer-name", "complex-dtype", "object-dtype"])
def test_writer_refuses_unwritable_input_and_writes_nothing(tmp_path, tensors, metadata, key):
    path = tmp_path / "w.safetensors"
    with pytest.raises(LoraError) as info:
        write_safetensors(path, tensors, metadata)
    assert info.value.file == str(path)
    if key is not None:
        assert info.value.key == key
    assert list(tmp_path.iterdir()) == []


def test_lazy_tensor_that_breaks_its_promise_leaves_nothing(tmp_path):
    path = tmp_path / "lazy.safetensors"
    path.write_bytes(b"old")
    bad = LazyTensor(np.dtype(np.float32), (2, 3), lambda: np.zeros((3, 2), np.float32))
    with pytest.raises(LoraError, match="announced") as info:
        write_safetensors(path, {"a": TENSORS["a"], "lazy": bad})
    assert info.value.key == "lazy" and info.value.file == str(path)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["lazy.safetensors"]


# -- streaming writes: chunks, file ranges, the background writer ---------------------------------
def _chunked_inputs(tmp_path):
    source = tmp_path / "source.safetensors"
    big = np.arange(3000, dtype=np.float32).reshape(100, 30)
    write_safetensors(source, {"x": big})
    return source, big


@pytest.mark.parametrize("background", [False, True])
def test_chunks_and_file_ranges_write_the_same_bytes(tmp_path, background):
    from portable_lora.io.safetensors_io import SafetensorsFile

    source, big = _chunked_inputs(tmp_path)
    whole = tmp_path / "whole.safetensors"
    write_safetensors(whole, {"a": big, "b": big * 2})
    with SafetensorsFile(source) as f:
        chunks = LazyTensor(np.dtype(np.float32), (100, 30), lambda: (big[i:i + 7] for i in range(0, 100, 7)))
        copied = LazyTensor(np.dtype(np.float32), (100, 30), lambda: [f.file_range("x")])
        doubled = LazyTensor(np.dtype(np.float32), (100, 30), lambda: iter([big[:50] * 2, big[50:] * 2]))
        out = tmp_path / "chunked.safetensors"
        write_safetensors(out, {"a": chunks, "b": doubled}, background=background)
        assert out.read_bytes() == whole.read_bytes()
        write_safetensors(out, {"a": copied, "b": doubled}, background=background)
        assert out.read_bytes() == whole.read_bytes()
        buffer = np.empty((10, 30), np.float32)
        f.read_into("x", buffer, offset=30 * 4 * 5)
        assert np.array_equal(buffer, big[5:15])
        with pytest.raises(ValueError, match="outside"):
            f.read_into("x", buffer, offset=30 * 4 * 95)


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("chunks,match", [
    (lambda big: iter([big[:50]]), "produced 6000 bytes"),                       # too few
    (lambda big: iter([big, big[:1]]), "produced 12120 bytes"),                  # too many
    (lambda big: iter([big.astype(np.float64)]), "a chunk of float64"),          # wrong dtype
])
def test_chunked_tensor_that_breaks_its_promise_leaves_nothing(tmp_path, background, chunks, match):
    _, big = _chunked_inputs(tmp_path)
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    lazy = LazyTensor(np.dtype(np.float32), (100, 30), lambda: chunks(big))
    with pytest.raises(LoraError, match=match) as info:
        write_safetensors(path, {"a": big, "lazy": lazy}, background=background)
    assert info.value.key == "lazy" and path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "source.safetensors"]
