"""What one config field accepts: `Rule` and the dataclass-field makers `opt` / `setting`. A leaf module, so that
`config` (which reads the rules) and `registry` (which checks a criterion's settings carry them) both import it
without importing each other."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class Rule:
    """What one config field accepts. `parse_config` reads these; nothing else encodes a field's type or range."""
    kind: str                       # int | float | bool | str | resources ({cpu, gpu} per trial) | settings (an importance
                                    # criterion's own dataclass: its fields' rules check it, see _importance)
    many: bool = False              # a list of `kind` (one bare value is read as a one-item list)
    optional: bool = False          # null allowed (it means the default the field's comment describes)
    lo: float | None = None         # range: lo ≤ v (lo < v with lo_open), v ≤ hi (v < hi with hi_open)
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | Callable[[], Iterable[str]] | None = None  # allowed strings, or a function returning them
    check: Callable[[Any], str | None] | None = None  # further test of one value: what is wrong with it, or None
    empty: str | None = None        # lists: refuse [] with this fix
    unique: bool = False            # lists: no value twice (a grid value twice would run and count a trial twice)

    def choice_list(self) -> tuple:
        return tuple(self.choices() if callable(self.choices) else self.choices)


def opt(default, kind: str, **rule) -> Any:
    """A dataclass field with its `Rule` as metadata (lists and mappings get a fresh copy per instance)."""
    meta = {"rule": Rule(kind, **rule)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


setting = opt  # exported as gradauth.setting: a field of an importance criterion's settings dataclass
