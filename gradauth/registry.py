"""Registries of importance criteria, datasets and model architectures: the one place their names live.

The built-ins register themselves through the same calls a user's code makes (`gradauth/importance.py`, `data.py`,
`models.py`); the config's choices, the lookups and the "unknown name" messages are all read from here, so a new
criterion, dataset or architecture is one registration and no edit of gradauth:

    from gradauth import register_importance, register_dataset, register_model, setting

    @dataclass
    class Settings:
        power: float = setting(2.0, "float", lo=0)   # checked by the config like any built-in field

    @register_importance("lp", settings=Settings)
    def lp(model, ds, power):                        # -> {bn name: score per channel}; higher = more important
        ...

Where user code is found (every process that looks a name up loads it on first use, and again when the list below
grows):
- `GRADAUTH_PLUGINS`: comma-separated module names (importable where gradauth runs) or paths of `.py` files;
- installed packages' entry points in the group `gradauth.plugins`;
- or the caller's own code, registering before it runs a stage.
Ray workers get the same registrations from the sweep driver (`snapshot` → `restore`): plugin modules by name, `.py`
plugins by their source text (so a worker needs no copy of the file), and functions registered in a driver script
(`__main__`) by value. This module imports neither torch nor PyYAML.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import GradauthError
from .rules import Rule

KINDS = ("importance", "dataset", "model")
ENV = "GRADAUTH_PLUGINS"
ENTRY_POINT_GROUP = "gradauth.plugins"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ARCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # an arch may also be a prefix like torchvision:
_BUILTIN_MODULES = {"importance": "gradauth.importance", "dataset": "gradauth.data", "model": "gradauth.models"}


@dataclass(frozen=True)
class ImportanceEntry:
    """`fn(model, ds, **settings) -> {bn name: scores}`; `settings` a dataclass whose fields carry config rules
    (`setting(...)`), or None; `label(settings) -> str` names the source in trial ids and tables (default: the
    name); `check_data(settings, ds) -> problem | None` is asked once the data is loaded, before training."""
    name: str
    fn: Callable
    settings: type | None = None
    label: Callable[[Any], str] | None = None
    check_data: Callable[[Any, Any], str | None] | None = None
    origin: str = ""


@dataclass(frozen=True)
class DatasetEntry:
    """`load(cfg: DataConfig, seed: int) -> data.Loaded` (uint8 train and test images, labels, class count);
    gradauth holds out validation, takes subsets and computes the normalisation the same way for every dataset."""
    name: str
    load: Callable
    origin: str = ""


@dataclass(frozen=True)
class ModelEntry:
    """`build(arch, num_classes, in_channels, width) -> nn.Module` with BatchNorm after the convolutions to lock.
    With `prefix`, every arch starting with `name` is this entry's (e.g. resnet<depth>, torchvision:<name>);
    `check(arch) -> problem | None` says which of them it refuses, without building anything."""
    name: str
    build: Callable
    prefix: bool = False
    check: Callable[[str], str | None] | None = None
    shown: str = ""
    origin: str = ""

    def matches(self, arch: str) -> bool:
        return arch.startswith(self.name) if self.prefix else arch == self.name


_TABLES: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
_LOADING: list[str] = []              # the plugin being imported now (its registrations are restored by re-import)
_LOADED: dict[str, tuple] = {}        # plugin key -> ("module", name, None) | ("file", path, source)
_BUILTINS_DONE: set[str] = set()


def table(kind: str) -> dict[str, Any]:
    """The live name -> entry table of one kind, in registration order (tests may monkeypatch.setitem into it)."""
    _ensure(kind)
    return _TABLES[kind]


# ---- registering ---------------------------------------------------------------------------------------------

def _origin(fn: Callable, builtin: bool) -> str:
    if builtin:
        return "builtin"
    if _LOADING:
        return "plugin:" + _LOADING[-1]
    return getattr(fn, "__module__", None) or "__main__"


def _same_code(a: Callable, b: Callable) -> bool:
    """A module imported twice (a plugin restored on a worker that also had it) registers its own function again."""
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == \
        (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def _add(kind: str, entry, fn: Callable, replace: bool, builtin: bool) -> None:
    if not builtin:
        _ensure(kind, plugins=False)  # a user's name must not silently shadow a built-in loaded later
    if not isinstance(entry.name, str) or not (_ARCH if kind == "model" else _NAME).fullmatch(entry.name):
        raise GradauthError(f"cannot register {kind} {entry.name!r}: use a plain name (letters, digits, '.', '_', "
                            f"'-'{', :' if kind == 'model' else ''}; at most 64; not starting with '.' or '-'), it "
                            f"names trials and files")
    if not callable(fn):
        raise GradauthError(f"cannot register {kind} {entry.name!r}: {fn!r} is not a function")
    tab = _TABLES[kind]
    old = tab.get(entry.name)
    if kind == "model" and old is None and not entry.prefix:
        old = next((e for e in tab.values() if e.prefix and e.matches(entry.name)
                    and not (e.check and e.check(entry.name))), None)
    if old is not None and not replace and not _same_code(_fn_of(old), fn):
        raise GradauthError(f"cannot register {kind} {entry.name!r}: {old.name!r} is already registered (by "
                            f"{old.origin}); choose another name, or pass replace=True to override it on purpose")
    tab[entry.name] = entry


def _fn_of(entry) -> Callable:
    return getattr(entry, "fn", None) or getattr(entry, "load", None) or entry.build


def _check_settings(name: str, settings: type | None) -> None:
    if settings is None:
        return
    if not dataclasses.is_dataclass(settings) or not isinstance(settings, type):
        raise GradauthError(f"importance {name!r}: settings must be a dataclass (its fields made with "
                            f"gradauth.setting(default, kind, ...)), got {settings!r}")
    bare = [f.name for f in dataclasses.fields(settings) if not isinstance(f.metadata.get("rule"), Rule)]
    if bare:
        raise GradauthError(f"importance {name!r}: settings field(s) {', '.join(bare)} carry no rule: declare each "
                            f"with gradauth.setting(default, kind, ...) so the config can check it")
    if "name" in {f.name for f in dataclasses.fields(settings)}:
        raise GradauthError(f"importance {name!r}: a setting may not be called `name` (that key names the criterion)")


def register_importance(name: str, fn: Callable | None = None, *, settings: type | None = None,
                        label: Callable[[Any], str] | None = None, check_data: Callable | None = None,
                        replace: bool = False, _builtin: bool = False):
    """Register an importance criterion `fn(model, ds, **settings) -> {bn name: score per channel}` (higher = more
    important: the lock removes the highest). Use as a decorator or call with `fn`. See `ImportanceEntry`."""
    def add(f: Callable) -> Callable:
        _check_settings(name, settings)
        _add("importance", ImportanceEntry(name, f, settings, label, check_data, _origin(f, _builtin)), f, replace,
             _builtin)
        return f
    return add(fn) if fn is not None else add


def register_dataset(name: str, load: Callable | None = None, *, replace: bool = False, _builtin: bool = False):
    """Register a dataset `load(cfg: DataConfig, seed: int) -> gradauth.data.Loaded`. Decorator or call."""
    def add(f: Callable) -> Callable:
        _add("dataset", DatasetEntry(name, f, _origin(f, _builtin)), f, replace, _builtin)
        return f
    return add(load) if load is not None else add


def register_model(name: str, build: Callable | None = None, *, prefix: bool = False,
                   check: Callable[[str], str | None] | None = None, shown: str | None = None,
                   replace: bool = False, _builtin: bool = False):
    """Register an architecture `build(arch, num_classes, in_channels, width) -> nn.Module` under the exact name,
    or (`prefix=True`) for every arch starting with `name`, `check(arch)` naming what it refuses. The module must
    be traceable by torch.fx and have BatchNorm after the convolutions the lock prunes. Decorator or call."""
    def add(f: Callable) -> Callable:
        _add("model", ModelEntry(name, f, prefix, check, shown or (name + "<…>" if prefix else name),
                                 _origin(f, _builtin)), f, replace, _builtin)
        return f
    return add(build) if build is not None else add


# ---- looking up ----------------------------------------------------------------------------------------------

def names(kind: str) -> tuple[str, ...]:
    """The registered names of one kind, built-ins first, as the config's choices and messages list them."""
    return tuple(e.shown if kind == "model" else e.name for e in table(kind).values())


def importance(name: str) -> ImportanceEntry:
    return _get("importance", name, "importance")


def dataset(name: str) -> DatasetEntry:
    return _get("dataset", name, "data.name")


def _get(kind: str, name: str, where: str):
    entry = table(kind).get(name)
    if entry is None:
        raise GradauthError(f"unknown {where} {name!r}: choose one of {', '.join(names(kind))}"
                            f" (or register yours: {hint()})")
    return entry


def model(arch: str) -> ModelEntry | None:
    """The entry that builds `arch`: an exact name first, else the longest matching prefix; None if none does."""
    tab = table("model")
    if arch in tab and not tab[arch].prefix:
        return tab[arch]
    found = [e for e in tab.values() if e.prefix and e.matches(arch)]
    return max(found, key=lambda e: len(e.name)) if found else None


def hint() -> str:
    return f"gradauth.register_* in a module named in ${ENV}"


# ---- plugins -------------------------------------------------------------------------------------------------


def arch_problem(arch: str) -> str | None:
    """Why `build_model` would refuse `arch` (with the fix), or None: the config check, without building anything."""
    entry = model(arch)
    if entry is None:
        return f"{arch!r} is not a known model.arch: choose one of {', '.join(names('model'))} (or register yours: {hint()})"
    return entry.check(arch) if entry.check else None


def _ensure(kind: str, plugins: bool = True) -> None:
    if kind not in _BUILTINS_DONE:
        _BUILTINS_DONE.add(kind)
        importlib.import_module(_BUILTIN_MODULES[kind])
    if plugins:
        load_plugins()


def _specs_from_env() -> list[str]:
    return [s.strip() for s in os.environ.get(ENV, "").split(",") if s.strip()]


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def load_plugins(specs: list[str] | None = None) -> None:
    """Import the plugins named in `specs` (default: $GRADAUTH_PLUGINS) and the `gradauth.plugins` entry points,
    each once per process. A plugin that cannot be imported is one GradauthError saying which and why."""
    for spec in _specs_from_env() if specs is None else specs:
        if _is_file(spec):
            path = Path(spec).expanduser().resolve()
            if str(path) in _LOADED:
                continue
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise GradauthError(f"{ENV} names {spec}, which cannot be read ({getattr(e, 'strerror', None) or e}):"
                                    f" give an existing .py file or an importable module name")
            _load_file(str(path), source)
        elif spec not in _LOADED:
            _load_module(spec)
    if specs is None and ENTRY_POINT_GROUP not in _LOADED:
        _LOADED[ENTRY_POINT_GROUP] = ("entry_points", ENTRY_POINT_GROUP, None)
        from importlib.metadata import entry_points
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _guarded(f"entry point {ep.name} ({ep.value})", ep.value, ep.load)


def _guarded(what: str, key: str, load: Callable[[], Any]) -> None:
    _LOADING.append(key)
    try:
        load()
    except GradauthError as e:
        raise GradauthError(f"plugin {what}: {e}") from None
    except ModuleNotFoundError as e:
        raise GradauthError(f"plugin {what} cannot be imported ({e}): install it, or put its folder on PYTHONPATH "
                            f"(on a Ray cluster: in the job's runtime_env)") from None
    except Exception as e:  # third-party code: any failure is the plugin's, and one line says so
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise GradauthError(f"plugin {what} failed while importing ({type(e).__name__}{': ' + first if first else ''})"
                            f": fix the plugin") from None
    finally:
        _LOADING.pop()


def _load_module(name: str) -> None:
    _guarded(f"module {name}", name, lambda: importlib.import_module(name))
    _LOADED[name] = ("module", name, None)


def _load_file(path: str, source: str) -> None:
    """Run a plugin file's source as the module named by its stem (the source, not the path: a Ray worker on another
    machine gets the text from the driver)."""
    mod_name = Path(path).stem
    if not mod_name.isidentifier():
        raise GradauthError(f"{ENV} names {path}: its file name must be a Python module name (letters, digits, _)")
    known = sys.modules.get(mod_name)
    if known is not None and getattr(known, "__file__", None) != path:
        raise GradauthError(f"{ENV} names {path}, but a module {mod_name!r} is already imported from "
                            f"{getattr(known, '__file__', None) or 'elsewhere'}: rename the plugin file")

    def run():
        spec = importlib.util.spec_from_loader(mod_name, loader=None, origin=path)
        module = importlib.util.module_from_spec(spec)
        module.__file__ = path
        sys.modules[mod_name] = module
        try:
            exec(compile(source, path, "exec"), module.__dict__)
        except BaseException:
            sys.modules.pop(mod_name, None)
            raise
    _guarded(f"file {path}", path, run)
    _LOADED[path] = ("file", path, source)


@dataclass(frozen=True)
class Plugins:
    """What a Ray worker needs to see this process's registrations (see the module docstring)."""
    specs: tuple = ()       # ("module", name, None) | ("file", path, source), in load order
    entries: tuple = ()     # (kind, entry) registered from a driver script (__main__), pickled by value


def snapshot() -> Plugins:
    specs = [v for v in _LOADED.values() if v[0] in ("module", "file")]
    entries = []
    for kind in KINDS:
        for e in _TABLES[kind].values():
            if e.origin in ("builtin", "") or e.origin.startswith("plugin:"):
                continue
            if e.origin == "__main__":
                entries.append((kind, e))
            elif ("module", e.origin, None) not in specs:
                specs.append(("module", e.origin, None))  # the user's own importable module: imported by name
    return Plugins(tuple(specs), tuple(entries))


def restore(plugins: Plugins | None) -> None:
    """On a worker: load what `snapshot` saw on the driver (each plugin once per process)."""
    if plugins is None:
        return
    for how, key, source in plugins.specs:
        if key in _LOADED:
            continue
        if how == "file":
            _load_file(key, source)
        else:
            _load_module(key)
    for kind, e in plugins.entries:
        if e.name not in _TABLES[kind]:
            _ensure(kind, plugins=False)
            _TABLES[kind][e.name] = e
