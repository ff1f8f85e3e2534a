"""The AutoML-risks study's MLflow runs as per-model tables (PROTOCOLS section 4; Pang et al.,
"On the Security Risks of AutoML", USENIX Security 2022): clean-victim accuracy, label-flip
CAD, per-model attack metrics, the PGD-overlap counts and the architecture statistics.

Everything here reads MLflow only (params, metrics, artifacts of the trial runs of stages
``victims`` and ``attacks``); nothing imports the trial code.

Conventions:

* A *setting* is ``"<dataset>/<params>"`` (e.g. ``cifar10/paper``): the two parameter sets
  are never pooled.
* A *model row* is the mean over the runs (e.g. seeds) of one model in one setting, so
  family comparisons count models, not runs.
* CAD (PROTOCOLS 4, label-flip poisoning) = acc(parent) - acc(poisoned): the clean
  reference of a poisoned victim is its parent in the model lineage, the victim run whose
  param ``lineage_key`` equals the poisoned run's ``parent_key`` (both logged by the victim
  kind; :mod:`nasrisk.study.tags`). Runs without those params (an MLflow store written before
  model lineages) fall back to matching the clean victim (p = 0) with the same model, dataset,
  parameter set, seed and profile; when several qualify (e.g. a 600-epoch and a 50-epoch
  retraining recipe), the one whose remaining params (train recipe, model kwargs, data sizes)
  also match is used, otherwise their mean, with a note.

Tag and param names are :mod:`nasrisk.study.tags`'s (``param.<config field>`` for the trial's
own config fields: ``params``, ``seed``, ``victim.model``, ...).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# one download per run: MLflow's per-download progress bars would bury the CLI's summary
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow.exceptions import MlflowException  # noqa: E402 - after the telemetry switch

from nasrisk.analysis.load import param_col, tag_col  # noqa: E402
from nasrisk.study import tags  # noqa: E402

#: victim-stage metrics, in table order (acc and gradient variance, paper Eq. 14 / artifact)
VICTIM_METRICS = ("acc", "grad_var_init", "grad_var_trained", "grad_var_init_artifact",
                  "grad_var_trained_artifact", "param_count")
#: attack-stage metrics, in table order (PROTOCOLS 4 table)
ATTACK_METRICS = ("asr_m", "asr_l", "asr_eps_1", "asr_eps_2", "asr_eps_4", "asr_eps_8",
                  "asr_eps_16", "nes_asr_m", "nes_asr_l", "nes_queries_m", "nes_queries_l",
                  "overlap_fooled")
ARCH_STATS = ("cell_depth", "cell_width", "skip_count")
FAMILIES = ("nas", "manual", "variant")
KEY = ["setting", "dataset", "params", "model", "family"]
# params that differ between a poisoned victim and its clean reference, or say nothing
# about the weights (the fallback matching of runs without lineage params)
_NOT_IDENTITY = {param_col(n) for n in (
    tags.P_POISON_FRACTION, "victim_key", tags.P_LINEAGE_KEY, tags.P_PARENT_KEY, tags.P_LINEAGE,
    "measure_grad_var", "contours", tags.P_STAGE, tags.P_KIND, "cell_depth", "cell_width",
    "skip_count", tags.P_FAMILY)}


def _col(df: pd.DataFrame, name: str, default: object) -> pd.Series:
    if name in df.columns:
        return df[name]
    return pd.Series([default] * len(df), index=df.index, dtype=object)


def _numeric(df: pd.DataFrame, name: str) -> pd.Series:
    if name not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[name], errors="coerce").astype(float)


def _settings(dataset: pd.Series, params: pd.Series) -> pd.Series:
    return dataset.astype(str) + "/" + params.astype(str)


def _joined(frame: pd.DataFrame) -> pd.Series:
    if frame.empty or frame.shape[1] == 0:
        return pd.Series("", index=frame.index, dtype=object)
    # pandas 3 keeps NaN as missing through astype(str): stringify each cell explicitly
    return frame.map(lambda v: "" if pd.isna(v) else str(v)).agg("|".join, axis=1)


def _key_col(runs: pd.DataFrame, name: str) -> pd.Series:
    """A store-key param as strings, missing (NaN once in a frame) where not logged."""
    col = _col(runs, param_col(name), None)
    return col.astype(object).map(lambda v: None if pd.isna(v) else str(v))


def victim_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per victim-stage run: ``run_id``, :data:`KEY` columns, ``seed``, ``profile``,
    ``poison`` (float), ``lineage_key`` / ``parent_key`` (strings, NaN where not logged;
    ``""`` parent for a base model), ``ident`` (all weight-determining params but the poison fraction, as
    one string: the fallback matching), ``base`` (model/dataset/params/seed/profile), the
    victim metrics and the architecture statistics (NaN where absent)."""
    v = pd.DataFrame({"run_id": _col(runs, "run_id", ""),
                      "start_time": _col(runs, "start_time", pd.NaT)})
    v["model"] = _col(runs, param_col(tags.P_MODEL), "?").astype(str)
    v["dataset"] = _col(runs, param_col(tags.P_DATASET), "?").astype(str)
    v["params"] = _col(runs, param_col("params"), "paper").fillna("paper").astype(str)
    v["family"] = _col(runs, param_col(tags.P_FAMILY), "").fillna("").astype(str)
    v["setting"] = _settings(v["dataset"], v["params"])
    v["seed"] = _col(runs, param_col("seed"), 0).astype(str)
    v["profile"] = _col(runs, param_col(tags.P_PROFILE), "").fillna("").astype(str)
    v["poison"] = _numeric(runs, param_col(tags.P_POISON_FRACTION)).fillna(0.0)
    v["stage"] = _col(runs, tag_col(tags.STAGE), "").fillna("").astype(str)
    v["lineage_key"] = _key_col(runs, tags.P_LINEAGE_KEY)
    v["parent_key"] = _key_col(runs, tags.P_PARENT_KEY)
    ident_cols = sorted(c for c in runs.columns
                        if c.startswith("param.") and c not in _NOT_IDENTITY
                        and not c.startswith(param_col("steps")))
    v["ident"] = _joined(runs[ident_cols])
    v["base"] = _joined(v[["model", "dataset", "params", "seed", "profile"]])
    for m in VICTIM_METRICS:
        v[m] = _numeric(runs, m)
    for s in ARCH_STATS:
        v[s] = _numeric(runs, param_col(s))
    return v.reset_index(drop=True)


def attack_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per attack-stage run: ``run_id``, :data:`KEY` columns, ``attack``,
    ``victim_poison``, ``lineage_key`` (of the attacked model; NaN where not logged) and
    every attack metric (NaN where that attack does not produce it). Model, dataset and
    poison fraction come from the kind's extra params, else from the nested victim config
    (``victim.model`` ...)."""
    a = pd.DataFrame({"run_id": _col(runs, "run_id", ""),
                      "start_time": _col(runs, "start_time", pd.NaT)})
    for name in (tags.P_MODEL, tags.P_DATASET):
        a[name] = _col(runs, param_col(name), None).fillna(
            _col(runs, param_col(f"victim.{name}"), "?")).astype(str)
    a["params"] = _col(runs, param_col("params"), None).fillna(
        _col(runs, param_col("victim.params"), "paper")).astype(str)
    a["family"] = _col(runs, param_col(tags.P_FAMILY), "").fillna("").astype(str)
    a["setting"] = _settings(a["dataset"], a["params"])
    a["attack"] = _col(runs, param_col(tags.P_ATTACK), "?").astype(str)
    a["victim_poison"] = _numeric(runs, param_col(tags.P_POISON_FRACTION)).fillna(
        _numeric(runs, param_col(f"victim.{tags.P_POISON_FRACTION}"))).fillna(0.0)
    a["lineage_key"] = _key_col(runs, tags.P_LINEAGE_KEY)
    a["seed"] = _col(runs, param_col("seed"), 0).astype(str)
    a["profile"] = _col(runs, param_col(tags.P_PROFILE), "").fillna("").astype(str)
    for m in (*ATTACK_METRICS, "victim_acc"):
        a[m] = _numeric(runs, m)
    return a.reset_index(drop=True)


def accuracy_table(victims: pd.DataFrame) -> pd.DataFrame:
    """Clean-victim accuracy (poison fraction 0), models x settings, mean over seeds; rows
    ordered by family (nas, manual, variant, other) then model."""
    clean = victims[victims["poison"] == 0]
    if clean.empty:
        return pd.DataFrame(columns=["family", "model"])
    table = clean.pivot_table(index=["family", "model"], columns="setting", values="acc",
                              aggfunc="mean").reset_index()
    table.columns.name = None
    return order_families(table)


def order_families(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` sorted by family (nas, manual, variant, then others) and model."""
    rank = {f: i for i, f in enumerate(FAMILIES)}
    order = df["family"].map(lambda f: rank.get(f, len(FAMILIES)))
    return (df.assign(_r=order).sort_values(["_r", "model"], kind="stable")
            .drop(columns="_r").reset_index(drop=True))


def _by_ident(r: pd.Series, clean: pd.DataFrame,
              notes: list[str]) -> tuple[float, str] | None:
    """The fallback clean reference of a poisoned victim without lineage params."""
    exact = clean[clean["ident"] == r["ident"]] if r["ident"] else clean.iloc[0:0]
    base = clean[clean["base"] == r["base"]]
    if len(exact) == 1 or (len(exact) > 1 and exact["acc"].nunique() == 1):
        return float(exact["acc"].iloc[0]), "exact"
    if len(base) == 1:
        return float(base["acc"].iloc[0]), "base"
    if len(base) > 1:
        notes.append(f"CAD of {r['model']} on {r['setting']} at p={r['poison']:g}: "
                     f"{len(base)} clean victims of the same model/seed qualify; their "
                     "mean accuracy is the reference.")
        return float(base["acc"].mean()), f"mean of {len(base)}"
    notes.append(f"No clean victim (p=0) for {r['model']} on {r['setting']} seed "
                 f"{r['seed']}: its CAD at p={r['poison']:g} is missing.")
    return None


def cad_table(victims: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """CAD of every victim (PROTOCOLS 4: CAD = acc(clean) - acc(poisoned); clean victims get
    CAD 0 at p = 0, the start of the curves): columns :data:`KEY`, ``seed``, ``poison``,
    ``acc``, ``acc_clean``, ``cad``, ``ref`` (how the clean reference was found:
    ``lineage`` = the parent's run by its lineage key; for runs without lineage params
    ``exact``, ``base``, ``mean of k``) and notes on the victims with no reference."""
    notes: list[str] = []
    clean = victims[victims["poison"] == 0]
    by_key = victims.dropna(subset=["lineage_key"]).groupby("lineage_key")["acc"]
    accs = {k: list(g) for k, g in by_key} if len(victims) else {}
    fallback = 0
    rows = []
    for _, r in victims.iterrows():
        parent = r["parent_key"] if isinstance(r["parent_key"], str) else ""  # NaN: not logged
        if r["poison"] == 0:
            ref, how = r["acc"], "self"
        elif parent:  # a lineage child: its parent's run (weights identical by key)
            if parent not in accs:
                notes.append(f"No victim run of the parent (lineage key {parent}) of "
                             f"{r['model']} on {r['setting']} at p={r['poison']:g}: its CAD "
                             "is missing.")
                continue
            ref, how = float(np.mean(accs[parent])), "lineage"
        else:
            found = _by_ident(r, clean, notes)
            if found is None:
                continue
            (ref, how), fallback = found, fallback + 1
        rows.append({**{k: r[k] for k in KEY}, "seed": r["seed"], "poison": r["poison"],
                     "acc": r["acc"], "acc_clean": ref, "cad": ref - r["acc"], "ref": how})
    if fallback:
        notes.append(f"CAD of {fallback} poisoned victim run(s) without lineage params (an "
                     "MLflow store from before model lineages): clean reference matched by "
                     "model, dataset, parameter set, seed, profile and recipe.")
    cols = [*KEY, "seed", "poison", "acc", "acc_clean", "cad", "ref"]
    return pd.DataFrame(rows, columns=cols), notes


def cad_column(p: float) -> str:
    """The per-model column name of CAD at poison fraction ``p`` (``cad_p40`` for 0.4)."""
    return f"cad_p{100 * p:g}".replace(".", "_")


def per_model_table(victims: pd.DataFrame, attacks: pd.DataFrame,
                    cad: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, model): the mean over runs of every clean-victim metric, every
    attack metric (attacks on clean victims only) and CAD at every poison fraction > 0
    (:func:`cad_column`), and the architecture statistics."""
    parts = []
    clean = victims[victims["poison"] == 0]
    if not clean.empty:
        parts.append(clean.groupby(KEY)[[*VICTIM_METRICS, *ARCH_STATS]].mean())
    on_clean = attacks[attacks["victim_poison"] == 0]
    if not on_clean.empty:
        parts.append(on_clean.groupby(KEY)[list(ATTACK_METRICS)].mean())
    poisoned = cad[cad["poison"] > 0]
    if not poisoned.empty:
        wide = poisoned.pivot_table(index=KEY, columns="poison", values="cad", aggfunc="mean")
        wide.columns = [cad_column(p) for p in wide.columns]
        parts.append(wide)
    if not parts:
        return pd.DataFrame(columns=KEY)
    table = pd.concat(parts, axis=1).reset_index()
    table = table.dropna(axis=1, how="all")
    return order_families(table.sort_values("setting", kind="stable"))


def _download(client, run_id: str, name: str, dst: Path) -> Path | None:
    """``name`` from the run's artifacts (at the root, or one folder down), or None."""
    try:
        entries = client.list_artifacts(run_id)
    except (MlflowException, OSError):  # an unreadable artifact store reads as "none"
        return None
    for e in entries:
        if not e.is_dir and Path(e.path).name == name:
            return Path(client.download_artifacts(run_id, e.path, str(dst)))
    for e in entries:
        if e.is_dir:
            for sub in client.list_artifacts(run_id, e.path):
                if not sub.is_dir and Path(sub.path).name == name:
                    return Path(client.download_artifacts(run_id, sub.path, str(dst)))
    return None


# what makes two runs the same measurement; runs that agree on these but differ in other
# settings (a study re-run after e.g. its NES budget changed) supersede each other
VICTIM_TRIAL = ("stage", "base", "poison")
ATTACK_TRIAL = ("setting", "model", "attack", "victim_poison", "seed", "profile")


def latest_per_trial(df: pd.DataFrame, cols: tuple[str, ...]) -> tuple[pd.DataFrame, int]:
    """The latest run of each ``cols`` combination (a re-configured trial supersedes its
    older runs instead of being averaged with them), and how many runs were dropped."""
    if df.empty:
        return df, 0
    keep = df.sort_values("start_time", kind="stable").groupby(list(cols)).tail(1)
    return keep.sort_index(), len(df) - len(keep)


def latest_per_model(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The latest run of each (setting, model), and how many older duplicates were dropped."""
    if df.empty:
        return df, 0
    keep = df.sort_values("start_time", kind="stable").groupby(["setting", "model"]).tail(1)
    return keep, len(df) - len(keep)


def load_npz_artifacts(client, runs: pd.DataFrame, name: str) -> dict[str, dict]:
    """``{run_id: arrays}`` of the ``name`` artifact (an ``.npz``) of each run that has it."""
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="nasrisk-report-") as tmp:
        for run_id in runs["run_id"]:
            path = _download(client, run_id, name, Path(tmp) / run_id)
            if path is not None:
                with np.load(path, allow_pickle=False) as z:
                    out[run_id] = {k: z[k] for k in z.files}
    return out


def overlap_counts(runs: pd.DataFrame, arrays: dict[str, dict]) -> tuple[pd.DataFrame, list[str]]:
    """Per setting and test input, how many NAS and how many manual models it fools (PROTOCOLS
    4, "PGD overlap ... per input, how many NAS (and manual) models it fools").

    ``runs`` holds one pgd_overlap run per (setting, model) (:func:`latest_per_model`);
    ``arrays[run_id]`` its ``overlap.npz`` (``indices``, ``fooled``). Only inputs present in
    every model's mask of the setting are counted (the attack kind draws the same seeded set
    for every model, so normally all of them). Columns ``setting``, ``index``, ``nas``,
    ``manual`` (counts), ``n_nas``, ``n_manual`` (models in the setting).
    """
    notes: list[str] = []
    frames = []
    for setting, sub in runs.groupby("setting", sort=True):
        masks: dict[str, dict[int, bool]] = {}
        families: dict[str, str] = {}
        for _, r in sub.iterrows():
            if r["run_id"] not in arrays:
                notes.append(f"pgd_overlap run of {r['model']} ({setting}) has no overlap.npz.")
                continue
            if r["family"] not in ("nas", "manual"):
                continue
            z = arrays[r["run_id"]]
            masks[r["model"]] = dict(zip(np.asarray(z["indices"]).tolist(),
                                         np.asarray(z["fooled"]).astype(bool).tolist(),
                                         strict=True))
            families[r["model"]] = r["family"]
        if not masks:
            continue
        sets = [set(m) for m in masks.values()]
        common = sorted(set.intersection(*sets))
        if len(common) < max(len(s) for s in sets):
            notes.append(f"{setting}: the models' overlap inputs differ; only the "
                         f"{len(common)} inputs every model attacked are counted.")
        counts = {f: np.zeros(len(common), dtype=int) for f in ("nas", "manual")}
        for model, mask in masks.items():
            counts[families[model]] += np.array([mask[i] for i in common], dtype=int)
        n_fam = {f: sum(1 for m in families.values() if m == f) for f in ("nas", "manual")}
        frames.append(pd.DataFrame({"setting": setting, "index": common,
                                    "nas": counts["nas"], "manual": counts["manual"],
                                    "n_nas": n_fam["nas"], "n_manual": n_fam["manual"]}))
    cols = ["setting", "index", "nas", "manual", "n_nas", "n_manual"]
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=cols)), notes


def overlap_histogram(counts: pd.DataFrame) -> pd.DataFrame:
    """From :func:`overlap_counts`: per setting and k, the number of inputs fooled by exactly
    k NAS models (``inputs_nas``) and by exactly k manual models (``inputs_manual``)."""
    rows = []
    for setting, sub in counts.groupby("setting", sort=True):
        k_max = int(max(sub["n_nas"].max(), sub["n_manual"].max()))
        for k in range(k_max + 1):
            rows.append({"setting": setting, "k": k, "inputs_nas": int((sub["nas"] == k).sum()),
                         "inputs_manual": int((sub["manual"] == k).sum())})
    return pd.DataFrame(rows, columns=["setting", "k", "inputs_nas", "inputs_manual"])


def arch_stats_table(per_model: pd.DataFrame) -> pd.DataFrame:
    """PROTOCOLS 1.3 architecture statistics (cell depth, cell width in units of c, skip
    count of the normal cell, as the victim kind logged them) of every DARTS-space model, one
    row per model (the genotype's statistics do not depend on the setting)."""
    stats = [s for s in ARCH_STATS if s in per_model.columns]
    if per_model.empty or not stats:
        return pd.DataFrame(columns=["family", "model", *ARCH_STATS])
    darts = per_model.dropna(subset=stats, how="all")
    return order_families(darts.groupby(["family", "model"])[stats].first().reset_index())
