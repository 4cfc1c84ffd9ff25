"""Which adapter module a merge put into a layer: shared by the framework adapters' merge
records, so that ``unmerge`` takes back only the merge it was given (stacked adapters come back
in the reverse order of merging) and refuses another adapter's, instead of undoing it with the
wrong scale. No framework is imported here.
"""

from __future__ import annotations

import weakref

from ..adapter import LoraModule
from ..errors import LoraError

__all__ = ["Identity", "check_last", "shared_weight_error", "later_merge_error"]


def shared_weight_error(prefix: str, name: str, other: str) -> LoraError:
    """merge() into a weight the model also holds under ``other``, which apply() leaves alone."""
    return LoraError(f"{prefix} module {name!r} holds its weight together with {other!r} (tied or "
                     f"shared weights): merging would change {other!r} too, which apply() leaves as "
                     "it is. Untie the weights, or pass allow_shared=True to merge into the shared "
                     "weight anyway", key=name)


def later_merge_error(prefix: str, name: str, other: str) -> LoraError:
    """unmerge() from a shared weight into which ``other`` had a LoRA merged later."""
    return LoraError(f"{prefix} module {name!r} shares its weight with {other!r}, which had a LoRA "
                     "merged into it after this one; unmerge that first (the reverse order of "
                     "merging)", key=name)


class Identity:
    """A merged module, as cheaply as a merge of many layers allows: the name it was merged
    under, its kind, scale rule, alpha, shapes and dtypes, and a weak reference to it."""

    __slots__ = ("key", "source", "rank", "dora")

    def __init__(self, name: str, module: LoraModule):
        self.key = _key(name, module)
        self.source = weakref.ref(module)
        self.rank, self.dora = module.rank, module.magnitude is not None

    def matches(self, name: str, module: LoraModule) -> bool:
        """Whether ``module`` under ``name`` is what was merged: the same object, or one with
        the same key and the same numbers (an adapter loaded again); a module that is gone
        is taken on its key."""
        if self.key != _key(name, module):
            return False
        merged = self.source()
        return merged is None or merged is module or _same_numbers(merged, module)


def _key(name: str, module: LoraModule) -> tuple:
    A, B = module.A, module.B
    return (name, module.kind, module.rule, module.alpha, A.shape, B.shape, A.dtype, B.dtype,
            module.magnitude is None)


def _same_numbers(a: LoraModule, b: LoraModule) -> bool:
    # two modules of one key: an adapter loaded again has the same factors, another trained
    # adapter practically never has the same first and last elements (reading every byte
    # would cost more than an 8B model's merge on a GPU)
    return all(x.size == 0 or (x.flat[0].tobytes() == y.flat[0].tobytes()
                               and x.flat[-1].tobytes() == y.flat[-1].tobytes())
               for x, y in ((a.A, b.A), (a.B, b.B)))


def check_last(identity: Identity | None, name: str, module: LoraModule) -> None:
    """Raise the LoraError for unmerging ``module`` under ``name`` when the layer's last merge
    (``identity``; ``None``: nothing merged) is not it."""
    if identity is None:
        raise LoraError(f"module {name!r} has no merged LoRA to unmerge", key=name)
    if identity.matches(name, module):
        return
    if identity.key[0] == name and (identity.rank, identity.dora) != (module.rank, module.magnitude is not None):
        kind = {False: "LoRA", True: "DoRA"}
        raise LoraError(f"module {name!r}: the last merge was a rank {identity.rank} {kind[identity.dora]}, "
                        f"the adapter has a rank {module.rank} {kind[module.magnitude is not None]}", key=name)
    raise LoraError(f"unmerge: the LoRA merged last into {name!r} is not this adapter's; unmerge "
                    "adapters in the reverse order of merging", key=name)
