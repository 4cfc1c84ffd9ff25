"""``convert``: read an adapter in one format, write it in another (atomically, never over an
existing output unless forced), optionally reading it back to prove ΔW survived."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .. import formats
from ..formats._common import mapped_reads
from ..errors import LoraError
from ._checkpoint import Checkpoint
from ._util import check_output, collect_warnings, human_bytes, load_adapter, path_bytes, source_name
from ._verify import VerifyReport, verify

__all__ = ["convert", "ConvertReport"]


def _strip(name: str, prefix: str | None) -> str:
    if not prefix:
        return name
    if not name.startswith(prefix) or len(name) == len(prefix):
        raise LoraError(f"module {name!r} does not start with the prefix {prefix!r} to strip", key=name)
    return name[len(prefix):]


@dataclass
class ConvertReport:
    src: str
    dst: str
    from_format: str | None
    to_format: str
    detected_because: str | None
    modules: int
    bytes: int
    convention: str | None
    warnings: list[str] = field(default_factory=list)
    verified: VerifyReport | None = None

    @property
    def ok(self) -> bool:
        return self.verified is None or self.verified.ok

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "src": self.src, "dst": self.dst, "from_format": self.from_format,
                "to_format": self.to_format, "detected_because": self.detected_because,
                "modules": self.modules, "bytes": self.bytes, "convention": self.convention,
                "warnings": self.warnings,
                "verified": None if self.verified is None else self.verified.to_json()}

    def table(self) -> str:
        lines = [f"{self.src} ({self.from_format}) -> {self.dst} ({self.to_format}): "
                 f"{self.modules} modules, {human_bytes(self.bytes)}"]
        if self.detected_because:
            lines.append(f"  source detected as {self.from_format}: {self.detected_because}")
        if self.convention:
            lines.append(f"  convention: {self.convention}")
        if self.verified is not None:
            v = self.verified
            lines.append("  verified: " + ("ΔW identical within tolerance, max relative error "
                                           f"{v.max_relative_error:.2e}" if v.ok else
                                           f"{len(v.differing())} modules DIFFER after reading back"))
            if not v.ok:
                lines.append(v.table())
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def convert(src: Any, dst: str | os.PathLike, *, to: str, from_format: str | None = None,
            convention: str | None = None, modules_from: str | os.PathLike | None = None,
            force: bool = False, check: bool = False, load_options: Mapping[str, Any] | None = None,
            save_options: Mapping[str, Any] | None = None, strip_prefix: str | None = None,
            add_prefix: str | None = None, durable: bool | None = None) -> ConvertReport:
    """Convert ``src`` (a path in any format, or an Adapter) to format ``to`` at ``dst``.

    ``modules_from``: a checkpoint whose ``<module>.weight`` keys list the model's modules,
    passed to the loader as ``modules=[...]`` (kohya names need it). ``check`` reads ``dst``
    back and compares ΔW with the source (:func:`verify`). ``strip_prefix`` / ``add_prefix``
    rename every module (mlx-vlm wants ``language_model.``, kohya and diffusers a component such
    as ``unet.`` or ``text_encoder.``); a name without the prefix to strip is an error.
    ``durable`` fsyncs the output (see :mod:`portable_lora.io.atomic`).

    >>> convert("adapter_peft", "adapter_mlx", to="mlx-lm", check=True).ok  # doctest: +SKIP
    True
    """
    formats.get_format(to)  # an unknown target fails before any work
    out = check_output(dst, force)
    seen: list[str] = []
    with collect_warnings(seen):
        opts = dict(load_options or {})
        if modules_from is not None:
            with Checkpoint(modules_from) as ckpt:
                opts["modules"] = ckpt.module_names()
        with mapped_reads():  # the tensors are written out at once: no copies of them
            adapter = load_adapter(src, format=from_format, convention=convention, options=opts)
            if strip_prefix or add_prefix:
                adapter = adapter.rename(lambda name: (add_prefix or "") + _strip(name, strip_prefix))
            formats.save(adapter, out, format=to, overwrite=force, durable=durable, **dict(save_options or {}))
        verified = None
        if check:
            verified = verify(adapter, out, format_b=to, modules=list(adapter))
    return ConvertReport(src=source_name(src), dst=str(out), from_format=adapter.provenance.get("source_format"),
                         to_format=to, detected_because=adapter.provenance.get("detected_because"),
                         modules=len(adapter), bytes=path_bytes(out),
                         convention=adapter.provenance.get("convention"), warnings=seen, verified=verified)

