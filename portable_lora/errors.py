"""The library's one error type.

Every problem with user input (a file, a tensor, a config field, an argument) raises
:class:`LoraError`, a ``ValueError`` subclass, whose message names where the problem is
(file, tensor or field) and what was expected and found.
"""

from __future__ import annotations

__all__ = ["LoraError"]


class LoraError(ValueError):
    """Bad adapter input: names the file, the tensor or field, what was expected and found.

    Attributes ``file``, ``key`` and ``detail`` keep the parts separately for programs.
    """

    def __init__(self, detail: str, *, file: object = None, key: str | None = None):
        self.file = None if file is None else str(file)
        self.key = key
        self.detail = detail
        where = []
        if self.file is not None:
            where.append(self.file)
        if key is not None:
            where.append(f"[{key}]")
        prefix = " ".join(where)
        super().__init__(f"{prefix}: {detail}" if prefix else detail)

    def with_file(self, file: object) -> "LoraError":
        """The same error with ``file`` filled in (for errors raised below the file layer)."""
        if self.file is not None:
            return self
        return LoraError(self.detail, file=file, key=self.key)
