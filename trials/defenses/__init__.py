"""Backdoor defenses (registered in ``DEFENSES``, each a
:class:`~nasrisk.trials.defenses.entry.DefenseEntry`): NeuralCleanse, STRIP and Fine-Pruning
(EVAS, ICLR 2023, Tables 4-5; PROTOCOLS 5 (e)), one module each, usable on any stored model
through the ``defense`` trial kind. :mod:`.triggers` holds the BadNet patch and the trigger
inputs a defense is measured on."""

from . import fine_pruning, neural_cleanse, strip  # noqa: F401  (register)
