"""Fuzzing every format's loader with byte- and value-level mutations of valid files.

For each format whose module exists (found with ``importlib.util.find_spec``, so formats are
covered as they land), a valid output is made with ``portable_lora.save(adapter, path,
format=F)``. Hypothesis then mutates one of its files (each ``.safetensors`` and ``.json``):
flipped bytes, truncation, a duplicated or deleted region, a changed number in the header,
or a JSON value (also inside the JSON held in safetensors metadata) replaced by one of another
type. Loading the result, with detection and with the format named, must return an Adapter
or raise LoraError: never another exception, never a hang (each load is bounded by a
``SIGALRM`` timer), and never a write (the directory is unchanged, byte for byte).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import portable_lora as pl
from portable_lora import LoraError

LOAD_SECONDS = 5
EXAMPLES = int(os.environ.get("PORTABLE_LORA_FUZZ_EXAMPLES", "40"))
# The same examples every run (no flaky CI); PORTABLE_LORA_FUZZ_RANDOM=1 explores new ones.
DERANDOMIZE = not os.environ.get("PORTABLE_LORA_FUZZ_RANDOM")

# Module-name sets tried in order until a format can hold the adapter (formats that need a
# component prefix, such as diffusers or kohya, refuse bare transformer names).
CANDIDATE_SHAPES = [
    {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.mlp.down_proj": (6, 10)},
    {"language_model.model.layers.0.self_attn.q_proj": (8, 6),
     "language_model.model.layers.0.mlp.down_proj": (6, 10)},
    {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 6),
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (6, 8)},
    {"transformer.transformer_blocks.0.attn.to_q": (8, 6),
     "transformer.transformer_blocks.0.attn.to_out.0": (6, 8)},
    {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (8, 6),
     "text_encoder.text_model.encoder.layers.0.mlp.fc2": (6, 10)},
]


def available_formats() -> list[str]:
    return [name for name, module in pl.FORMATS.items()
            if importlib.util.find_spec(f"portable_lora.formats.{module}") is not None]


def _build(fmt: str, root: Path) -> tuple[Path, str | None]:
    """A valid output of ``fmt`` under ``root``, or (None, why not)."""
    errors = []
    for i, shapes in enumerate(CANDIDATE_SHAPES):
        adapter = pl.examples.random_adapter(shapes, rank=2, alpha=4.0, seed=i)
        for name in ("adapter", "adapter.safetensors"):
            path = root / f"{i}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pl.save(adapter, path, format=fmt)
                    pl.load(path, format=fmt)
            except LoraError as exc:
                errors.append(str(exc)[:160])
                shutil.rmtree(path.parent, ignore_errors=True)
                continue
            return path, None
    return None, "; ".join(errors[:2])


@pytest.fixture(scope="module")
def valid_outputs(tmp_path_factory) -> dict[str, tuple[Path | None, str | None]]:
    root = tmp_path_factory.mktemp("valid")
    return {fmt: _build(fmt, root / fmt) for fmt in available_formats()}


def _files(output: Path) -> list[Path]:
    if output.is_file():
        return [output]
    return sorted(p for p in output.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


# -- mutations ---------------------------------------------------------------------------------------
NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
INTERESTING_NUMBERS = [b"0", b"-1", b"1", b"-0.0", b"2", b"3", b"1e309", b"-1e309", b"NaN", b"Infinity",
                       b"1.5", b"18446744073709551615", b"18446744073709551616", b"9" * 30,
                       b"1" + b"0" * 400, b"4294967296", b"true", b"null", b'"8"', b"[]"]
ODD_VALUES = [None, True, False, 0, -1, -2.5, 1.5, 10 ** 30, 10 ** 400, 1e308, 5e-324, math.inf, -math.inf, math.nan, "", "8",
              "alpha/rank", "../../etc/passwd", "os.system", [], [1, 2], {}, {"__class__": "os.system"}]


def _header_span(raw: bytes) -> tuple[int, int] | None:
    if len(raw) < 8:
        return None
    (n,) = struct.unpack("<Q", raw[:8])
    return (8, 8 + n) if 8 + n <= len(raw) else None


def _repack(raw: bytes, header_text: bytes) -> bytes:
    span = _header_span(raw)
    return struct.pack("<Q", len(header_text)) + header_text + raw[span[1]:]


def _json_paths(value, path=()):
    """Every path inside ``value``, descending into strings that hold JSON objects."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_paths(v, path + (i,))
    elif isinstance(value, str) and value.startswith("{"):
        try:
            inner = json.loads(value)
        except ValueError:
            return
        yield from _json_paths(inner, path + (("json",),))


def _replace(value, path, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    if head == ("json",):
        return json.dumps(_replace(json.loads(value), rest, new))
    if isinstance(value, dict):
        if new is _DELETE and not rest:
            return {k: v for k, v in value.items() if k != head}
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    if new is _DELETE and not rest:
        del copy[head]
        return copy
    copy[head] = _replace(copy[head], rest, new)
    return copy


_DELETE = object()


@st.composite
def mutations(draw, raw: bytes, is_json: bool):
    """(description, mutated bytes) for one file's bytes."""
    kind = draw(st.sampled_from(["flip", "truncate", "duplicate", "delete", "number", "value", "value"]))
    span = (0, len(raw)) if is_json else _header_span(raw)
    region = span if span and draw(st.booleans()) else (0, len(raw))  # favour the header
    if kind == "flip":
        out = bytearray(raw)
        printable = draw(st.booleans())  # printable bytes keep a header valid UTF-8, so reach JSON
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(region[0], max(region[1] - 1, region[0])))
            if at < len(out):
                if printable:
                    out[at] = draw(st.sampled_from(b'0123456789-.eE{}[]:,"\\ aAtfnu'))
                else:
                    out[at] ^= draw(st.integers(1, 255))
        return f"flip in {region}", bytes(out)
    if kind == "truncate":
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        return f"truncate at {at}", raw[:at]
    if kind in ("duplicate", "delete"):
        start = draw(st.integers(region[0], max(region[1] - 1, region[0])))
        end = draw(st.integers(min(start + 1, len(raw)), min(start + 64, len(raw))))
        if kind == "delete":
            return f"delete [{start}, {end})", raw[:start] + raw[end:]
        at = draw(st.integers(0, len(raw)))
        return f"duplicate [{start}, {end}) at {at}", raw[:at] + raw[start:end] + raw[at:]
    if kind == "number":
        if not is_json and draw(st.booleans()):  # the length prefix itself
            value = draw(st.sampled_from([0, 1, len(raw), len(raw) - 8, 2 ** 63, 2 ** 64 - 1, 100_000_001]))
            return f"length prefix {value}", struct.pack("<Q", value) + raw[8:]
        text = raw[span[0]:span[1]] if span else raw
        found = list(NUMBER.finditer(text))
        if not found:
            return "no number", raw
        match = draw(st.sampled_from(found))
        new = draw(st.one_of(st.sampled_from(INTERESTING_NUMBERS),
                             st.integers(-(2 ** 70), 2 ** 70).map(lambda i: str(i).encode())))
        edited = text[:match.start()] + new + text[match.end():]
        if is_json or span is None:
            return f"number {match.group()!r} -> {new!r}", edited
        keep_prefix = draw(st.booleans())  # a consistent length prefix reaches deeper checks
        return f"number {match.group()!r} -> {new!r}", (
            raw[:8] + edited + raw[span[1]:] if keep_prefix else _repack(raw, edited))
    # kind == "value": a JSON value replaced (or deleted), also inside metadata-held JSON
    text = raw[span[0]:span[1]] if span else raw
    try:
        document = json.loads(text)
    except ValueError:
        return "not JSON", raw
    paths = [p for p in _json_paths(document) if p and p[-1] != ("json",)]  # the string itself is p[:-1]
    if not paths:
        return "empty JSON", raw
    path = draw(st.sampled_from(paths))
    new = draw(st.sampled_from(ODD_VALUES + [_DELETE]))
    edited = json.dumps(_replace(document, path, new)).encode("utf-8")
    label = f"value at {path} -> {'deleted' if new is _DELETE else repr(new)[:40]}"
    return label, edited if is_json or span is None else _repack(raw, edited)


# -- the property ------------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the alarm: a BaseException, so a loader's ``except Exception`` cannot swallow it."""


def _on_alarm(signum, frame):
    raise Hang(f"a load took more than {LOAD_SECONDS} s")


def _load_bounded(path: Path, fmt: str | None):
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, LOAD_SECONDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pl.load(path, format=fmt)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_one(output: Path, target: Path, original: bytes, label: str, mutated: bytes, fmt: str) -> None:
    root = output.parent
    target.write_bytes(mutated)
    try:
        before = _snapshot(root)
        for named in (None, fmt):
            try:
                result = _load_bounded(output, named)
            except LoraError as exc:
                assert exc.file is not None, f"{label}: the error names no file: {exc}"
                continue
            except Hang:
                pytest.fail(f"{fmt} ({'detected' if named is None else 'named'}): {label} of "
                            f"{target.name}: the load hung")
            except Exception as exc:  # noqa: BLE001 - the property under test
                raise AssertionError(f"{fmt} ({'detected' if named is None else 'named'}): {label} "
                                     f"of {target.name} raised {type(exc).__name__}: {exc}"[:600]) from exc
            assert isinstance(result, pl.Adapter), f"{label}: returned {type(result).__name__}"
        assert _snapshot(root) == before, f"{fmt}: {label}: loading changed the directory"
    finally:
        target.write_bytes(original)


@pytest.mark.parametrize("fmt", available_formats())
def test_format_builds_a_valid_output(valid_outputs, fmt):
    path, why = valid_outputs[fmt]
    if path is None:
        pytest.skip(f"cannot build a valid {fmt} output from the example adapters: {why}")
    assert _files(path), f"{fmt} wrote no .safetensors or .json file"


@pytest.mark.parametrize("fmt", available_formats())
def test_mutated_files_load_or_raise_lora_error(valid_outputs, fmt):
    output, why = valid_outputs[fmt]
    if output is None:
        pytest.skip(f"cannot build a valid {fmt} output from the example adapters: {why}")
    files = _files(output)
    originals = {p: p.read_bytes() for p in files}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def fuzz(data):
        target = data.draw(st.sampled_from(files), label="file")
        original = originals[target]
        label, mutated = data.draw(mutations(original, target.suffix == ".json"), label="mutation")
        _check_one(output, target, original, label, mutated, fmt)

    fuzz()
    assert {p: p.read_bytes() for p in files} == originals


# -- targeted config hazards, in every JSON a format reads (files and header metadata) ----------------
HUGE = 10 ** 400
DEEP = "[" * 100_000 + "]" * 100_000


def _numeric_paths(document) -> list[tuple]:
    out = []
    for path in _json_paths(document):
        value = document
        try:
            for step in path:
                value = json.loads(value) if step == ("json",) else value[step]
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and path:
            out.append(path)
    return out


def _json_texts(output: Path):
    """(file, label, text, rebuild(text) -> bytes) for every JSON text a format stores."""
    for target in _files(output):
        raw = target.read_bytes()
        if target.suffix == ".json":
            yield target, "file", raw.decode("utf-8"), lambda text: text.encode("utf-8")
            continue
        span = _header_span(raw)
        header = json.loads(raw[span[0]:span[1]])
        for key, value in header.get("__metadata__", {}).items():
            if value.startswith("{"):
                def rebuild(text, key=key, header=header, raw=raw):
                    edited = {**header, "__metadata__": {**header["__metadata__"], key: text}}
                    return _repack(raw, json.dumps(edited).encode("utf-8"))
                yield target, key, value, rebuild


def _huge_numbers(text: str):
    document = json.loads(text)
    for path in _numeric_paths(document):
        yield f"{path} = 10**400", json.dumps(_replace(document, path, HUGE))


def _deep_nesting(text: str):
    yield "nested 100000 deep", DEEP


def _repeated_keys(text: str):
    """Each top-level key repeated with a different value before it: last-wins would keep the original."""
    document = json.loads(text)
    for key, value in document.items():
        decoy = json.dumps(key) + ": " + json.dumps(ODD_VALUES[len(key) % len(ODD_VALUES)]
                                                    if value is not None else 1) + ", "
        yield f"{key!r} repeated", "{" + decoy + text.lstrip()[1:]


HAZARDS = {"huge-number": _huge_numbers, "deep-nesting": _deep_nesting, "repeated-key": _repeated_keys}


def _hazard_failures(output: Path, fmt: str, hazard: str) -> list[str]:
    failures = []
    for target, where, text, rebuild in list(_json_texts(output)):
        original = target.read_bytes()
        for label, edited in HAZARDS[hazard](text):
            target.write_bytes(rebuild(edited))
            try:
                for named in (None, fmt):
                    how = "detected" if named is None else "named"
                    try:
                        _load_bounded(output, named)
                    except LoraError:
                        continue
                    except Exception as exc:  # noqa: BLE001 - the property under test
                        failures.append(f"{target.name} [{where}] {label} ({how}): {type(exc).__name__}: {exc}"[:240])
                        continue
                    if hazard == "repeated-key":
                        failures.append(f"{target.name} [{where}] {label} ({how}): loaded, keeping one value silently")
            finally:
                target.write_bytes(original)
    return failures


# Known bugs in files this suite does not own: {(format, hazard): reason}, marked strict xfail
# (a fix turns the xfail into a failure, to be removed here). None at present.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _hazard_params():
    params = []
    for fmt in available_formats():
        for hazard in HAZARDS:
            reason = KNOWN_BUGS.get((fmt, hazard))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(fmt, hazard, id=f"{fmt}-{hazard}", marks=marks))
    return params


@pytest.mark.parametrize("fmt, hazard", _hazard_params())
def test_config_hazards_are_lora_errors(valid_outputs, fmt, hazard):
    output, why = valid_outputs[fmt]
    if output is None:
        pytest.skip(f"cannot build a valid {fmt} output from the example adapters: {why}")
    failures = _hazard_failures(output, fmt, hazard)
    assert not failures, "\n".join(failures[:10])


# -- conversion hazards: a negative or tiny alpha never hangs a converter ----------------------------
@pytest.mark.parametrize("alpha", [-4.0, -1e-30, 1e-30], ids=["negative", "tiny-negative", "tiny"])
@pytest.mark.parametrize("fmt", available_formats())
def test_unusual_alpha_converts_exactly_or_is_refused_without_hanging(tmp_path, valid_outputs, fmt, alpha):
    """One peer converter loops forever on a negative alpha: ours keep ΔW or say why not."""
    if valid_outputs[fmt][0] is None:
        pytest.skip(f"cannot build a valid {fmt} output from the example adapters")
    shapes = CANDIDATE_SHAPES[int(valid_outputs[fmt][0].parent.name)]  # the names this format holds
    adapter = pl.examples.random_adapter(shapes, rank=2, alpha=alpha, dtype=np.float32)
    path = tmp_path / valid_outputs[fmt][0].name
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, LOAD_SECONDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.save(adapter, path, format=fmt)
            back = pl.load(path, format=fmt)
    except LoraError as exc:
        assert exc.file is not None or exc.key is not None, f"the refusal says nothing about where: {exc}"
        return
    except Hang:
        pytest.fail(f"{fmt}: converting alpha={alpha} hung")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    for name in adapter:
        expected = adapter.delta_weight(name, dtype=np.float64)
        got = back.delta_weight(name, dtype=np.float64)
        scale = np.abs(expected).max()
        assert scale > 0 and np.abs(got - expected).max() <= 1e-6 * scale, f"{fmt}: ΔW of {name} changed"
