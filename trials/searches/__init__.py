"""Searches over an architecture space: EVAS's regularised evolution on kappa and its
random-search baseline (:mod:`.evolution`), and the score cache they share (:mod:`.cache`)."""
