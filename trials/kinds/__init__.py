"""Trial kinds: ``config -> metrics`` functions registered in TRIAL_KINDS."""
from . import (
    attack,  # noqa: F401
    calibrate,  # noqa: F401
    defense,  # noqa: F401
    evas,  # noqa: F401
    evas_eval,  # noqa: F401
    evas_search,  # noqa: F401
    kappa_atlas,  # noqa: F401
    victim,  # noqa: F401
)
