"""`gradauth report DIR`: report.md and plots/*.png from what the earlier stages left in DIR.

Reads trials.parquet (required), levels.json, attack.parquet and slices.parquet (each only if present), so a report
can be made at any point after the sweep. Every input is read and validated (schema.py) before anything is written,
so a damaged file leaves the old report and plots as they were. A derived file is shown only while it matches the
current inputs: levels.json must record the sha256 of the current trials.parquet, the attack the sha256 of the
current levels.json (and of release/manifest.json when both record and release exist); otherwise its section is
one line saying it is stale and which command refreshes it. Figures are drawn on `matplotlib.figure.Figure` (the
Agg canvas, no pyplot state, no display needed on a cluster head) and, like every output, written under a
temporary name then renamed.

Thief trials (rows `thief-…` of trials.parquet, see select.py) are kept out of the level plots and get their own
section: per fraction of the labelled data the best thief from each public lock and from scratch, the head start,
and `plots/thieves.png`; the levels table then says whether each level sells and by what margin over the best thief.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from . import rundir
from .errors import GradauthError
from .fsutil import atomic_path, write_text
from .schema import STATUSES, file_sha256, read_levels, thief_rows
from .knobs import LockSpec, Schedule, columns, fill_defaults, from_row, knobs, schedule_dict
from .select import GROUP, SELECT_COLUMNS, head_start, load_trials, lock_label, schedule_label, thief_table

REPORT_COLUMNS = [*SELECT_COLUMNS, "dataset", "arch", "base_acc", "seed", "params", "flops", "seconds"]
# The schedule columns and their axis titles, from Schedule's fields (knobs.py): a new knob gets its plot panel.
SCHEDULE = columns(Schedule, group_only=True)
KNOBS = {m["column"]: m["title"] for _, m in knobs(Schedule) if m["group"]}
MAX_SCHEDULE_LINES = 4  # beyond this acc_vs_lock shows only the best schedule per lock value, to stay readable
REASONS = {"unlockable": "status unlockable (locked accuracy above sweep.lock_bound, not fine-tuned)",
           "error": "status error (the trial failed)", "status": "no fine_acc recorded",
           "locked_acc": "locked accuracy above max_locked_acc",
           "worthless": "fine_acc not min_gap above max_locked_acc", "min_gap": "fine_acc within min_gap of a level",
           "noise": "gap to a level not above 2 × seed std", "no_chain": "too few levels fit below it",
           "not_needed": "not needed", "thief": "fine_acc within min_gap of the best thief (does not sell)",
           "thief_trial": "a thief trial (attack measurement), not a level", "other": "other"}


def write_report(out_dir: str | os.PathLike) -> Path:
    """Write DIR/report.md and DIR/plots/*.png; return the report's path. Inputs are all validated first."""
    out = Path(out_dir)
    trials = load_trials(out / rundir.TRIALS, REPORT_COLUMNS)
    trials = fill_defaults(fill_defaults(trials, LockSpec), Schedule).sort_values([*GROUP, "seed"], kind="stable")
    sel, levels_note = _current_levels(out, trials)
    attack, attack_note = _read_attack(out, sel)
    slices = _read_parquet(out / rundir.SLICES) if (out / rundir.SLICES).is_file() else None
    # ---- nothing is written above this line ----
    chance = 1 / trials["num_classes"].iloc[0]
    default = rundir.chance_bound(trials["num_classes"].iloc[0])
    bound = (sel or {}).get("settings", {}).get("max_locked_acc") or default
    is_thief = thief_rows(trials)
    thieves, trials_l = thief_table(trials[is_thief]), trials[~is_thief]
    if trials_l.empty:
        raise GradauthError(f"{out / 'trials.parquet'} holds only thief trials: run the sweep's level trials first")
    made = _plots(out / rundir.PLOTS, trials_l, sel, chance, bound)
    made += _thief_plot(out / rundir.PLOTS, thieves, sel, chance)
    md = [*_header(out, trials, sel, chance), *_levels_section(sel, levels_note), *_rejected_section(sel),
          *_thief_section(thieves, sel, made), *_plots_section(made), *_importance_section(trials_l, bound, made),
          *_attack_section(attack, attack_note, out / rundir.PLOTS, sel), *_slices_section(slices),
          *_trials_section(trials)]
    return write_text(out / rundir.REPORT, "\n".join(md) + "\n")


def _current_levels(out: Path, trials: pd.DataFrame) -> tuple[dict | None, str | None]:
    """(levels.json if it was selected from this trials.parquet, else None; the stale line if it is not)."""
    sel = read_levels(out / rundir.LEVELS, trials, required=False)
    if sel is None:
        return None, None
    if sel.get("trials_sha256") != file_sha256(out / rundir.TRIALS):
        why = "records no trials_sha256 (an older levels.json)" if "trials_sha256" not in sel else \
            "was selected from another version of trials.parquet"
        return None, (f"levels.json is stale: it {why}; run `gradauth select {out}` (then `gradauth release`, "
                      f"`gradauth report`) to refresh it.")
    return sel, None


def _read_attack(out: Path, sel: dict | None) -> tuple[tuple | None, str | None]:
    """((attack table, attack.md body) if present and derived from the current levels and release, None otherwise;
    the stale line if present but not current). A damaged attack file is refused, whatever its age."""
    from .attack import MD_STAMP, derived_from, md_stamp, read_derived
    path, md = out / rundir.ATTACK, out / rundir.ATTACK_MD
    if not path.is_file():
        return None, None
    df = _read_parquet(path)
    need = {"target", "attacker_fraction", "schedule", "recovered_acc"}
    if not need <= set(df.columns):
        raise GradauthError(f"{path}: missing columns {sorted(need - set(df.columns))}; "
                            "re-run `gradauth attack` to rewrite it")
    try:
        body = md.read_text(encoding="utf-8").splitlines() if md.is_file() else None
    except (UnicodeDecodeError, OSError):
        raise GradauthError(f"{md} is not readable UTF-8 text: re-run `gradauth attack {out}` to rewrite it") from None
    recorded, now = read_derived(path), derived_from(out)
    stale = None
    if sel is None:
        stale = "its levels.json is missing or stale"
    elif recorded is None:
        stale = "attack.parquet records no levels.json sha256 (an older attack)"
    elif recorded.get("levels_sha256") != now["levels_sha256"] or recorded.get("trials_sha256") != now["trials_sha256"]:
        stale = "it attacked another levels.json"
    elif None not in (recorded.get("manifest_sha256"), now["manifest_sha256"]) and \
            recorded["manifest_sha256"] != now["manifest_sha256"]:
        stale = "it attacked another release (release/manifest.json changed)"
    elif body is not None and (not body or body[0] != md_stamp(recorded)):
        stale = "attack.md does not match attack.parquet"
    if stale:
        return None, f"The attack results are stale: {stale}; run `gradauth attack {out}` to refresh them."
    try:  # drawn now, written later: a table whose values do not plot is refused before any file is touched
        fig = _attack_plot(df, sel)
    except (KeyError, TypeError, ValueError) as e:
        raise GradauthError(f"{path} has columns or values `gradauth attack` does not write ({type(e).__name__}: "
                            f"{str(e)[:80]}): re-run `gradauth attack {out}` to rewrite it") from None
    return (fig, [ln for ln in (body or []) if not ln.startswith(MD_STAMP)]), None


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise GradauthError(f"{path} is not a readable Parquet file ({type(e).__name__}): re-run the stage that "
                            f"writes it, or delete it to leave it out of the report") from None


# ---- plots ---------------------------------------------------------------------------------------------------------

def _plots(plots: Path, trials: pd.DataFrame, sel: dict | None, chance: float, bound: float) -> list[str]:
    """Draw every plot the data supports; delete stale ones from an earlier report so plots/ matches report.md."""
    figs = {"acc_vs_lock": _acc_vs_lock(trials, (sel or {}).get("levels", []), chance, bound),
            "finetune_knobs": _finetune_knobs(trials[trials["status"] == "ok"]),
            "importance": _importance_plot(trials, bound) if trials["importance"].nunique() > 1 else None}
    for name, fig in figs.items():
        if fig is None:
            (plots / f"{name}.png").unlink(missing_ok=True)
        else:
            _save(fig, plots / f"{name}.png")
    return [n for n, fig in figs.items() if fig is not None]


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def _mean_std(df: pd.DataFrame, keys: list[str], col: str) -> pd.DataFrame:
    """Mean and sample std (one seed: 0) of `col` per `keys`, sorted by the keys."""
    g = df.groupby(keys, dropna=False)[col].agg(["mean", "std"]).reset_index()
    return g.assign(std=g["std"].fillna(0.0)).sort_values(keys)


def _x(mode: str, values: pd.Series) -> pd.Series:
    return 100 * values if mode == "rate" else values


def _fine_lines(ok: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Fine_acc per lock value: one line per schedule if there are few, else the best schedule at each lock."""
    per = _mean_std(ok, ["lock_value", *SCHEDULE], "fine_acc")
    lines = list(per.groupby(SCHEDULE))
    if len(lines) <= MAX_SCHEDULE_LINES:
        return [(f"Fine_acc, {schedule_label(_sched(dict(zip(SCHEDULE, k))))}", f) for k, f in lines]
    return [("Fine_acc, best schedule per lock", per.loc[per.groupby("lock_value")["mean"].idxmax()])]


def _sched(row) -> dict:
    """levels.json's `schedule` of a row (a mapping by column)."""
    return schedule_dict(from_row(Schedule, row))


def _acc_vs_lock(trials: pd.DataFrame, levels: list[dict], chance: float, bound: float) -> Figure:
    """Locked and fine-tuned accuracy against the lock, one panel per (importance, lock mode): where the cliff is."""
    panels = trials[["importance", "lock_mode"]].drop_duplicates().sort_values(["importance", "lock_mode"])
    fig = Figure(figsize=(6.5 * len(panels), 4.8))
    for ax, (imp, mode) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.itertuples(index=False)):
        sub = trials[(trials["importance"] == imp) & (trials["lock_mode"] == mode)]
        p = _mean_std(sub.dropna(subset=["prun_acc"]), ["lock_value"], "prun_acc")
        ax.errorbar(_x(mode, p["lock_value"]), p["mean"], p["std"], marker="o", capsize=3, label="Prun_acc (locked)")
        for label, f in _fine_lines(sub[sub["status"] == "ok"]):
            ax.errorbar(_x(mode, f["lock_value"]), f["mean"], f["std"], marker="s", capsize=3, label=label)
        mine = [lv for lv in levels if lv.get("importance", imp) == imp and lv["lock_mode"] == mode]
        for i, lv in enumerate(mine):
            x = _x(mode, pd.Series([lv["lock_value"]]))[0]
            ax.plot(x, lv["fine_acc"], "*", ms=16, color="gold", mec="black", zorder=5,
                    label="chosen level" if i == 0 else None)
            ax.annotate(f"L{lv['level']}", (x, lv["fine_acc"]), textcoords="offset points", xytext=(8, 6))
        ax.axhline(chance, ls="--", color="gray", label=f"chance {chance:.3f}")
        ax.axhline(bound, ls="--", color="red", label=f"lock bound {bound:.3f}")
        if len(p) > 1 and p["lock_value"].min() > 0 and p["lock_value"].max() / p["lock_value"].min() > 10:
            ax.set_xscale("log")  # lock rates usually span decades (0.1 % … 10 %)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set(title=f"{imp}, {mode} lock", ylabel="top-1 accuracy", ylim=(0, 1.02),
               xlabel="lock rate (% of BN channels removed)" if mode == "rate" else f"lock {mode}")
        ax.legend(fontsize=7)
    return fig


def _finetune_knobs(ok: pd.DataFrame) -> Figure | None:
    """Fine_acc against each swept schedule knob, averaged over the other knobs and seeds, one line per lock."""
    knobs = [k for k in KNOBS if ok[k].nunique() > 1]
    if not knobs:
        return None
    fig = Figure(figsize=(5.5 * len(knobs), 4.5))
    for ax, knob in zip(fig.subplots(1, len(knobs), squeeze=False)[0], knobs):
        values = sorted(ok[knob].unique())
        pos = {v: i for i, v in enumerate(values)}  # even spacing: lr and data fraction are log-like, scope is a label
        for (imp, mode, val), sub in ok.groupby(["importance", "lock_mode", "lock_value"]):
            m = _mean_std(sub, [knob], "fine_acc")
            ax.errorbar(m[knob].map(pos), m["mean"], m["std"], marker="o", capsize=3,
                        label=f"{imp} {lock_label(mode, val)}")
        ax.set_xticks(range(len(values)), [f"{v:g}" if not isinstance(v, str) else v for v in values])
        ax.set(xlabel=KNOBS[knob], ylabel="Fine_acc (mean over other knobs, seeds)")
        ax.legend(fontsize=7)
    return fig


def _importance_plot(trials: pd.DataFrame, bound: float) -> Figure:
    """Locked accuracy against channels removed, per importance source: the steeper one locks with fewer channels."""
    m = _mean_std(trials.dropna(subset=["prun_acc"]), ["importance", "locked_channels"], "prun_acc")
    fig = Figure(figsize=(6.5, 4.8))
    ax = fig.subplots()
    for imp, sub in m.groupby("importance"):
        ax.errorbar(sub["locked_channels"], sub["mean"], sub["std"], marker="o", capsize=3, label=imp)
    ax.axhline(bound, ls="--", color="red", label=f"lock bound {bound:.3f}")
    ax.set(xlabel="locked channels", ylabel="Prun_acc (locked model)", ylim=(0, 1.02),
           title="Which importance collapses the model with fewer channels")
    ax.legend(fontsize=8)
    return fig


# ---- report.md -----------------------------------------------------------------------------------------------------

def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows), ""]


def _acc(x) -> str:
    return "–" if pd.isna(x) else f"{x:.3f}"


def _header(out: Path, trials: pd.DataFrame, sel: dict | None, chance: float) -> list[str]:
    t = trials.iloc[0]
    counts = trials["status"].value_counts()
    order = sorted(counts.index, key=lambda s: (STATUSES.index(s) if s in STATUSES else len(STATUSES), s))
    return [f"# gradauth report: {(sel or {}).get('experiment') or out.resolve().name}", "",
            f"{t['dataset']} · {t['arch']} · base accuracy {t['base_acc']:.3f} · chance {chance:.3f} · "
            f"{len(trials)} trials", "", "## Trials", "",
            *_table(["status", "trials"], [[s, int(counts[s])] for s in order])]


def _levels_section(sel: dict | None, note: str | None = None) -> list[str]:
    """The paper's Table 3: one row per level."""
    if note:
        return ["## Levels", "", note, ""]
    if sel is None:
        return ["## Levels", "", "No levels.json yet: run `gradauth select DIR` to choose the levels.", ""]
    how = {1: "each level has its own lock", 2: "all levels share one locked model"}.get(sel.get("method"), "")
    syn = lambda lv: lv.get("lock_granularity") == "synapse"
    rows = [[lv["level"], f"{lv.get('importance', '')} "
             f"{lock_label(lv['lock_mode'], lv['lock_value'], lv.get('lock_granularity', 'channel'))}"
             + (f" ({lv['locked_channels']} {'syn' if syn(lv) else 'ch'})" if "locked_channels" in lv else ""),
             schedule_label(lv["schedule"]), _acc(lv["prun_acc"]), f"{lv['fine_acc']:.3f} ± {lv['fine_acc_std']:.3f}",
             _acc(lv.get("fine_top3")), lv.get("seeds", len(lv["trial_ids"]))] for lv in sel["levels"]]
    s = sel.get("settings", {})
    knobs = ", ".join(f"{k} {v}" for k, v in s.items() if v is not None)
    head = ["Level", "Lock", "Schedule", "Prun_acc", "Fine_acc (top-1)", "Top-3", "Seeds"]
    thief = sel.get("thief") or {}
    note = []
    if thief.get("best_acc") is not None:
        gap = s.get("min_gap") or 0.0
        head.append("Sellable (over best thief)")
        for r, lv in zip(rows, sel["levels"]):
            m = lv.get("thief_margin", lv["fine_acc"] - thief["best_acc"])
            r.append(f"{'yes' if m >= gap - 1e-9 else 'no'} ({m:+.3f})")
        note = [f"Best thief without a key: {thief['best_acc']:.3f} ({(thief.get('best') or {}).get('label', '')}); "
                f"a level sells when it beats it by min_gap {gap:g}.", ""]
    return [f"## Levels (method {sel['method']}: {how})", "", *_table(head, rows), *note,
            *([f"Selected with {knobs}.", ""] if knobs else [])]


def _rejected_section(sel: dict | None, first: int = 10) -> list[str]:
    """How many trials each rule kept out, with one example each, then the first few in full."""
    if not sel or not sel["rejected"]:
        return []
    rej = pd.DataFrame(sel["rejected"])
    rej["kind"] = rej["kind"].fillna("other") if "kind" in rej else "other"
    rows = [[REASONS.get(k, k), len(g), g["why"].iloc[0]] for k, g in rej.groupby("kind", sort=False)]
    rows.sort(key=lambda r: -r[1])
    return ["## Rejected trials", "", *_table(["reason", "trials", "example"], rows),
            *(f"- `{r.trial_id}`: {r.why}" for r in rej.head(first).itertuples()),
            *([f"- … and {len(rej) - first} more (levels.json lists them all)"] if len(rej) > first else []), ""]


def _thief_plot(plots: Path, t: pd.DataFrame, sel: dict | None, chance: float) -> list[str]:
    """plots/thieves.png: the thief's accuracy against their share of the labelled data, from scratch and from each
    public lock measured (best schedule per fraction), with the levels as dashed lines. Removed when no thief ran."""
    if t.empty:
        (plots / "thieves.png").unlink(missing_ok=True)
        return []
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for (kind, imp, mode, value), g in t.groupby(["kind", "importance", "lock_mode", "lock_value"], sort=True):
        best = g.loc[g.groupby("ft_data_fraction")["fine_acc"].idxmax()].sort_values("ft_data_fraction")
        label = "from scratch" if kind == "scratch" else \
            f"public model, {imp} {lock_label(mode, value)} ({int(best['locked_channels'].max())} ch)"
        ax.errorbar(100 * best["ft_data_fraction"], best["fine_acc"], best["fine_acc_std"], marker="o", capsize=3,
                    ls=":" if kind == "scratch" else "-", color="black" if kind == "scratch" else None, label=label)
    for lv in (sel or {}).get("levels", []):
        ax.axhline(lv["fine_acc"], ls="--", color="gray", lw=1)
        ax.annotate(f"level {lv['level']}", (0.01, lv["fine_acc"]), xycoords=("axes fraction", "data"), fontsize=7,
                    va="bottom", color="gray")
    ax.axhline(chance, ls="--", color="lightgray", lw=1)
    fractions = sorted(t["ft_data_fraction"].unique())
    ax.set(xscale="log", xlabel="thief's labelled data (% of the training set)", ylabel="thief's top-1 (test)",
           ylim=(0, 1.02), title="Thieves without a key: the public model against training from scratch")
    ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}" for f in fractions])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    _save(fig, plots / "thieves.png")
    return ["thieves"]


def _thief_section(t: pd.DataFrame, sel: dict | None, made: list[str]) -> list[str]:
    """The thief trials: per fraction the best from scratch, from each public lock, and that lock's head start."""
    if t.empty:
        return []
    locks = t[t["kind"] == "public"][["importance", "lock_mode", "lock_value"]].drop_duplicates()
    locks = list(locks.itertuples(index=False, name=None))
    head = ["thief's data", "from scratch", *(f"public {i} {lock_label(m, v)}" for i, m, v in locks)]
    figs = {lk: {r["fraction"]: r for r in head_start(t, lk)} for lk in locks}
    rows = []
    for f, at in t.groupby("ft_data_fraction", sort=True):
        scr = at.loc[at["kind"] == "scratch", "fine_acc"]
        cells = [f"{100 * f:g}%", _acc(scr.max()) if len(scr) else "–"]
        for lk in locks:
            r = figs[lk].get(float(f))
            cells.append("–" if r is None or r["public"] is None else
                         f"{r['public']:.3f}" + ("" if r["head_start"] is None else f" ({r['head_start']:+.3f})"))
        rows.append(cells)
    scheds = sorted({(int(e), float(lr)) for e, lr in zip(t["ft_epochs"], t["ft_lr"])})
    lines = ["## Thieves: what a buyer gets without a key", "",
             "Thief trials of the sweep fine-tune the public model (every weight free; locked filters erased as "
             "released, or revived by a careful thief who resets the visibly locked channels first: the better of "
             "the two counts) or train from scratch on a share of the labelled training data "
             f"(schedule{'s' if len(scheds) > 1 else ''} {', '.join(f'{e} ep, lr {lr:g}' for e, lr in scheds)}). "
             "Cells: top-1 (mean over seeds, best schedule); in brackets the head start over scratch.", "",
             *_table(head, rows)]
    if "thieves" in made:
        lines += ["![Thieves](plots/thieves.png)", ""]
    return lines


def _plots_section(made: list[str]) -> list[str]:
    captions = {"acc_vs_lock": "Accuracy against the lock (★ chosen levels)",
                "finetune_knobs": "Fine-tune knobs", "importance": "Importance sources"}
    return ["## Plots", "", *(f"![{captions[n]}](plots/{n}.png)" for n in made if n not in ("importance", "thieves")),
            ""]


def _importance_section(trials: pd.DataFrame, bound: float, made: list[str]) -> list[str]:
    if "importance" not in made:
        return []
    m = trials.dropna(subset=["prun_acc"]).groupby(["locked_channels", "importance"])["prun_acc"].mean().unstack()
    rows = [[_int(ch), *("–" if pd.isna(v) else _acc(v) for v in r)] for ch, r in m.iterrows()]
    out = ["## Importance sources", "", _fewest_channels(trials, bound), "",
           "Locked accuracy (mean over seeds) by channels locked:", "",
           *_table(["locked channels", *(f"`{c}`" for c in m.columns)], rows),
           "![Importance sources](plots/importance.png)", ""]
    if "lock_granularity" in trials and bool((trials["lock_granularity"] == "synapse").all()):
        # a synapse sweep (lock.granularity: synapse): locked_channels counts hidden synapses
        words = (("channels locked", "synapses hidden"), ("locked channels", "hidden synapses"),
                 (" channels)", " synapses)"))
        for a, b in words:
            out = [line.replace(a, b) for line in out]
    return out


def _fewest_channels(trials: pd.DataFrame, bound: float) -> str:
    """One sentence: which importance source reaches the lock bound with the fewest locked channels."""
    m = trials.dropna(subset=["prun_acc"]).groupby(["importance", "locked_channels"])["prun_acc"].mean().reset_index()
    reach = m[m["prun_acc"] <= bound + 1e-9].groupby("importance")["locked_channels"].min().sort_values()
    never = sorted(set(m["importance"]) - set(reach.index))
    tail = "".join(f"; `{imp}` does not reach it within the swept locks (up to "
                   f"{int(m[m['importance'] == imp]['locked_channels'].max())} channels)" for imp in never)
    if reach.empty:
        return f"No importance source brings the locked accuracy down to the lock bound ({bound:.3f}){tail}."
    best = reach[reach == reach.iloc[0]].index.tolist()
    rest = ", ".join(f"{int(n)} for `{imp}`" for imp, n in reach.items() if imp not in best)
    names = [f"`{b}`" for b in best]
    who = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if len(best) > 1:
        return (f"{who} reach the lock bound (locked accuracy ≤ {bound:.3f}) with the same "
                f"{int(reach.iloc[0])} locked channels" + (f", against {rest}" if rest else "") + f"{tail}.")
    word = "fewer" if m["importance"].nunique() == 2 else "the fewest"
    return (f"{who} needs {word} locked channels to reach the lock bound (locked accuracy ≤ {bound:.3f}): "
            f"{int(reach.iloc[0])}" + (f", against {rest}" if rest else "") + f"{tail}.")


def _attack_section(attack: tuple | None, note: str | None, plots: Path, sel: dict | None) -> list[str]:
    """attack.parquet (from `gradauth attack`): its attack.md table embedded, and recovery against the thief's data;
    one stale line instead when it does not match the current levels and release."""
    if attack is None:
        (plots / "attack.png").unlink(missing_ok=True)
        return ["## Attack", "", note, ""] if note else []
    fig, body = attack
    lines = ["## Attack: fine-tuning the public model without a key", ""]
    if body:  # attack.md's own title is dropped, its table kept
        lines += [ln for ln in body if not ln.startswith("# ")] + [""]
    _save(fig, plots / "attack.png")
    return lines + ["![Attack](plots/attack.png)", ""]


def _attack_plot(df: pd.DataFrame, sel: dict | None) -> Figure:
    """Recovered top-1 vs the thief's share of the training data: one panel per thief schedule, a line per form."""
    from .attack import attack_label
    thief = df[(df["schedule"] != "owner") & df["target"].isin(["public", "scratch"])]
    thief = thief.assign(label=thief.apply(attack_label, axis=1))
    labels = list(dict.fromkeys(thief["label"]))
    scheds = list(dict.fromkeys(thief["schedule"])) or ["best"]
    colors = {lb: f"C{i % 10}" for i, lb in enumerate(labels)}
    fig = Figure(figsize=(5 * len(scheds), 5.4), layout="constrained")
    axes = fig.subplots(1, len(scheds), sharey=True, squeeze=False)[0]
    fractions = sorted(thief["attacker_fraction"].unique())
    for ax, sched in zip(axes, scheds):
        for lb in labels:
            sub = thief[(thief["label"] == lb) & (thief["schedule"] == sched)]
            if sub.empty:
                continue
            m = _mean_std(sub, ["attacker_fraction"], "recovered_acc")
            ax.errorbar(100 * m["attacker_fraction"], m["mean"], m["std"], marker="o", capsize=3, color=colors[lb],
                        ls=":" if lb.startswith("scratch") else "-", label=lb.removeprefix("public "))
        for lv in (sel or {}).get("levels", []):
            ax.axhline(lv["fine_acc"], ls="--", color="gray", lw=1)
            ax.annotate(f"level {lv['level']}", (0.01, lv["fine_acc"]), xycoords=("axes fraction", "data"),
                        fontsize=7, va="bottom", color="gray")
        ax.set(xscale="log", xlabel="thief's labelled data (% of the training set)", ylim=(0, 1.02),
               title=f"thief's schedule: {sched}")
        ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}" for f in fractions])
        ax.minorticks_off()
    axes[0].set_ylabel("recovered top-1 accuracy (test)")
    handles, names = axes[-1].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle("What a thief recovers from the public model without a key (dashed: the sold levels)")
    return fig


def _slices_section(df: pd.DataFrame | None) -> list[str]:
    """slices.parquet in brief: per layer, how concentrated NNSlicer's contribution is."""
    if df is None:
        return []
    lines = ["## Slices (NNSlicer)", "", f"{len(df)} rows ({', '.join(df.columns)}).", ""]
    if not {"layer", "channel", "contribution"} <= set(df.columns):
        return lines
    per = df.groupby(["layer", "channel"], sort=False)["contribution"].sum()
    rows = []
    for layer, c in per.groupby(level="layer", sort=False):
        top = c.sort_values(ascending=False).head(max(1, len(c) // 10)).sum()
        rows.append([layer, len(c), f"{c.sum():.4g}", f"{top / c.sum():.1%}" if c.sum() else "–"])
    return lines + _table(["layer", "channels", "total contribution", "share of top 10 % channels"], rows)


def _trials_section(trials: pd.DataFrame) -> list[str]:
    rows = [[t.trial_id, t.importance, lock_label(t.lock_mode, t.lock_value), _int(t.locked_channels),
             schedule_label(_sched(t._asdict())), _int(t.seed), t.status, _acc(t.prun_acc), _acc(t.fine_acc),
             _acc(t.fine_top3), _int(t.params), _int(t.flops), "–" if pd.isna(t.seconds) else f"{t.seconds:.1f}"]
            for t in trials.itertuples(index=False)]
    head = ["trial", "importance", "lock", "locked ch", "schedule", "seed", "status", "Prun_acc", "Fine_acc", "Top-3",
            "params", "FLOPs", "seconds"]
    return ["## All trials", "", *_table(head, rows)]


def _int(x) -> str:
    return "–" if pd.isna(x) else f"{int(x):,}"


__all__ = ["write_report"]
