"""Trial kinds: ``config -> metrics`` functions registered in TRIAL_KINDS."""
