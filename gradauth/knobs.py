"""What a trial is: one `LockSpec` (which channels to lock) and one `Schedule` (how to fine-tune), as plain frozen
dataclasses whose fields say, in their metadata (`knob`), everything the other stages derive from them:

- the trials.parquet column and its type (`column`, `kind`): `trial_columns()` lists them in file order;
- whether the field tells candidates apart in `gradauth select` (`group`: every knob but the seed), so seeds of one
  candidate differ only in the seed;
- the part of the trial id (`id`: a prefix; the value is written exactly, see `num`) and whether the part appears
  when the value is the field's default (`id_always`: the knobs that were there from the start always do, so their
  ids never change; a knob added later is left out at its default, so adding one keeps every existing id);
- the human label (`label`: a format or a function of the value; the report's and select's labels) and the title
  of the report's plot axis (`title`);
- the finetune config list the sweep's grid takes the values from (`config`; a knob without a config list runs at
  its default).

So adding a fine-tune knob is adding one field to `Schedule` (plus its use in `finetune.finetune`): its
`finetune.<config>` list in the YAML, checked by its `rule`, is added to `config.FinetuneConfig` from the field. This module imports nothing heavy (no torch, no pyarrow): the config,
schema and Ray layers all read it.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field, fields
from typing import Any, Callable

KINDS = ("int", "float", "str")


def knob(default: Any = dataclasses.MISSING, *, column: str, kind: str, label: str | Callable | None = None,
         title: str | None = None, id: str | Callable | None = None, id_always: bool = False, group: bool = True,
         config: str | None = None, rule: dict | None = None) -> Any:
    """A dataclass field of `LockSpec` / `Schedule` with its contract as metadata (see the module docstring).
    `id` is the trial-id prefix (a string, or a function of the whole spec for prefixes that depend on another field);
    None leaves the field out of the id (it is written by another field's part). `config` names the finetune config
    list of the knob's values; where `config.FinetuneConfig` does not declare that list itself, it gets one, checked
    by `rule` (`config.Rule` settings such as lo, hi, choices)."""
    assert kind in KINDS, kind
    meta = {"knob": {"column": column, "kind": kind, "label": label, "title": title or column, "id": id,
                     "id_always": id_always, "group": group, "config": config,
                     "rule": dict(rule or {})}}
    return field(default=default, metadata=meta)


def num(v: Any) -> str:
    """A number as trial ids and labels write it: `:g` where that is exact (0.005, 1e-05, 8), else the shortest
    repr that reads back as the same float (0.07123451, not `:g`'s 0.0712345), so distinct values never share a
    name. Whole numbers are written as integers."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    v = float(v)
    short = f"{v:g}"
    return short if float(short) == v else repr(v)


@dataclass(frozen=True)
class LockSpec:
    """Which channels the lock removes: the `importance` source's most important ones, by `mode` and `value`."""
    importance: str = knob(column="importance", kind="str", id="", id_always=True,
                           title="importance source")  # label, e.g. bn_gamma, slice, slice[3,5]
    mode: str = knob(column="lock_mode", kind="str", id=None, id_always=True, title="lock mode")  # rate | threshold
    value: float = knob(column="lock_value", kind="float", id=lambda lock: lock.mode, id_always=True,
                        title="lock value")
    # channel: BN channels ranked globally | synapse: conv/linear weights, the top `value` of each layer hidden
    # (NNSlicer's model protection). Added later: left out of ids at its default, so channel ids stay as they were.
    granularity: str = knob("channel", column="lock_granularity", kind="str", id="", title="lock granularity")

    @property
    def label(self) -> str:
        return lock_label(self.mode, self.value, self.granularity)


def lock_label(mode: str, value: float, granularity: str = "channel") -> str:
    """`rate 10%` or `threshold 0.5` (`synapse rate 50%` for a synapse lock): how the report and `gradauth select`
    show a lock."""
    text = f"rate {100 * value:g}%" if mode == "rate" else f"{mode} {value:g}"
    return text if granularity in ("channel", None) or granularity != granularity else f"{granularity} {text}"


def _pct(v: float) -> str:
    return f"{100 * v:g}% data"


@dataclass(frozen=True)
class Schedule:
    """How a locked model is fine-tuned (masks held): one field per knob. Add a knob here."""
    epochs: int = knob(column="ft_epochs", kind="int", label="{} ep", title="fine-tune epochs", id="e",
                       id_always=True, config="epochs")
    lr: float = knob(column="ft_lr", kind="float", label="lr {}", title="learning rate", id="lr", id_always=True,
                     config="lr")
    data_fraction: float = knob(1.0, column="ft_data_fraction", kind="float", label=_pct,
                                title="fraction of the training data", id="f", id_always=True, config="data_fraction")
    scope: str = knob("all", column="ft_scope", kind="str", label="{}", title="parameters trained", id="",
                      id_always=True, config="scope")  # all | bn (BN γ/β only) | head (last linear only)
    seed: int = knob(0, column="seed", kind="int", id="s", id_always=True, group=False, config="seeds")

    @property
    def label(self) -> str:
        return schedule_label(dataclasses.asdict(self), type(self))


# ---- what the rest of the package derives ----------------------------------------------------------------------

def knobs(cls) -> list[tuple[dataclasses.Field, dict]]:
    """(field, its knob metadata) of a LockSpec / Schedule class, in field order."""
    return [(f, f.metadata["knob"]) for f in fields(cls) if "knob" in f.metadata]


def columns(cls, group_only: bool = False) -> list[str]:
    return [m["column"] for f, m in knobs(cls) if m["group"] or not group_only]


def column_kinds(cls) -> dict[str, str]:
    return {m["column"]: m["kind"] for f, m in knobs(cls)}


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING


def cast(kind: str, v: Any) -> Any:
    """A value read back from a table (numpy scalar, float for an int column) as the field's plain Python type."""
    return {"int": int, "float": float, "str": str}[kind](v)


def from_row(cls, row, defaults: bool = True):
    """The LockSpec / Schedule of a trials.parquet row (a mapping by column name). A knob whose column the row
    lacks (a file written before the knob existed) takes its default."""
    kw = {}
    for f, m in knobs(cls):
        if m["column"] in row and row[m["column"]] is not None:
            kw[f.name] = cast(m["kind"], row[m["column"]])
        elif not (defaults and default_of(f) is not dataclasses.MISSING):
            raise KeyError(m["column"])
    return cls(**kw)


def to_row(obj) -> dict:
    """Column → value of a LockSpec / Schedule (the trials.parquet cells)."""
    return {m["column"]: getattr(obj, f.name) for f, m in knobs(type(obj))}


def fill_defaults(df, cls):
    """A trials table with every knob column of `cls`: a column it lacks (an older file) is its default."""
    missing = {m["column"]: default_of(f) for f, m in knobs(cls)
               if m["column"] not in df.columns and default_of(f) is not dataclasses.MISSING}
    return df.assign(**missing) if missing else df


def _fmt(spec: str | Callable, v: Any) -> str:
    if callable(spec):
        return spec(v)
    return spec.format(f"{v:g}" if isinstance(v, float) else v)  # labels are for people: `:g` (ids are exact)


def schedule_label(s: dict, cls=None) -> str:
    """`8 ep, lr 0.005, 100% data, all`: a schedule (a mapping by field name, as levels.json's `schedule`) as the
    report and `gradauth select` show it. Knobs without a label (the seed) and, for knobs added later, values at
    their default, are left out."""
    cls = cls or Schedule
    parts = []
    for f, m in knobs(cls):
        if m["label"] is None or f.name not in s:
            continue
        if not m["id_always"] and s[f.name] == default_of(f):
            continue
        parts.append(_fmt(m["label"], s[f.name]))
    return ", ".join(parts)


def id_parts(obj) -> list[str]:
    """The trial-id tokens of a LockSpec / Schedule (seed-like knobs, `group=False`, last)."""
    out, last = [], []
    for f, m in knobs(type(obj)):
        if m["id"] is None:
            continue
        v = getattr(obj, f.name)
        if not m["id_always"] and v == default_of(f):
            continue
        prefix = m["id"](obj) if callable(m["id"]) else m["id"]
        (out if m["group"] else last).append(f"{prefix}{num(v) if not isinstance(v, str) else v}")
    return out + last


def trial_id(lock: LockSpec, schedule: Schedule) -> str:
    """`bn_gamma-rate0.1-e8-lr0.005-f1-all-s0`: readable, and exact for any float (see `num`)."""
    return "-".join(id_parts(lock) + id_parts(schedule))


def schedules(ft, cls=None) -> list:
    """Every schedule of a finetune config section: the product of each knob's list (`config` in its metadata), in
    field order (the last knob varies fastest: epochs, lr, data_fraction, scope, seed); a knob the section has no
    list for runs at its default."""
    axes = []
    for f, m in knobs(cls or Schedule):
        values = getattr(ft, m["config"], None) if m["config"] else None
        if values is None:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"Schedule.{f.name} has no default and no finetune list")
            values = [f.default]
        axes.append([(f.name, cast(m["kind"], v)) for v in values])
    return [(cls or Schedule)(**dict(combo)) for combo in itertools.product(*axes)]


def schedule_dict(s: Schedule) -> dict:
    """levels.json's `schedule`: the grouping knobs by field name (the seed is not part of a level's schedule)."""
    return {f.name: getattr(s, f.name) for f, m in knobs(type(s)) if m["group"]}


__all__ = ["LockSpec", "Schedule", "knob", "num", "lock_label", "schedule_label", "trial_id", "columns",
           "column_kinds", "from_row", "to_row", "fill_defaults", "schedule_dict", "schedules", "knobs"]
