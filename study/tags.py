"""The MLflow tag and param names nasrisk writes: the one home that ``study/`` (which writes
them) and ``analysis/`` (which reads them) both import. Importing it costs nothing (no MLflow,
no torch).

Roles (tag :data:`ROLE`): ``trial`` (one run per planned trial), ``model`` (one run per stored
model or object a trial made: a base model or one lineage step, see
:mod:`nasrisk.trials.lineage`), ``summary`` (one per study report).
"""

from __future__ import annotations

# -- every run ---------------------------------------------------------------------------------
ROLE = "nasrisk.role"
STUDY = "nasrisk.study"
STAGE = "nasrisk.stage"
KIND = "nasrisk.kind"
STATUS = "nasrisk.status"  # running / done / failed / stopped
ERROR = "nasrisk.error"
WARNING = "nasrisk.warning"
PROFILE = "nasrisk.profile"
VERSION = "nasrisk.version"
GIT_COMMIT = "nasrisk.git_commit"
PARAMS = "nasrisk.params"
HOST = "nasrisk.host"
PID = "nasrisk.pid"

ROLE_TRIAL = "trial"
ROLE_MODEL = "model"
ROLE_SUMMARY = "summary"

# -- trial runs --------------------------------------------------------------------------------
TRIAL_KEY = "nasrisk.trial_key"
#: the run of the model (lineage entry) a trial used, and of the victim-stage trial that made it
MODEL_RUN_ID = "nasrisk.model_run_id"
VICTIM_RUN_ID = "nasrisk.victim_run_id"
#: a derived stage's trial: the run of the earlier stage's trial it was selected from
SOURCE_RUN_ID = "nasrisk.source_run_id"

# -- model runs (one per stored lineage entry) -------------------------------------------------
LINEAGE_KEY = "nasrisk.lineage_key"
PARENT_KEY = "nasrisk.parent_key"
PARENT_RUN_ID = "nasrisk.parent_run_id"
#: the trial run during which the model was made
MADE_BY_RUN_ID = "nasrisk.made_by_run_id"
STEP_KIND = "nasrisk.step_kind"

# -- summary runs ------------------------------------------------------------------------------
TRIAL_COUNT = "nasrisk.trial_count"
TRIAL_KEYS = "nasrisk.trial_keys"

# -- params (logged beside a trial's flattened config) -----------------------------------------
P_PROFILE = "profile"
P_STAGE = "stage"
P_KIND = "kind"
#: the store key of the model a trial trained, loaded or attacked (its whole lineage hashed)
P_LINEAGE_KEY = "lineage_key"
#: the key of that model's parent (the lineage without its last step; "" for a base model)
P_PARENT_KEY = "parent_key"
#: the lineage in words: "darts@cifar10 -> label_flip(fraction=0.1)"
P_LINEAGE = "lineage"
P_FAMILY = "family"
P_MODEL = "model"
P_DATASET = "dataset"
P_ATTACK = "attack"
P_POISON_FRACTION = "poison_fraction"  # the label-flip fraction of the model a trial used
