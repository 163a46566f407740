"""Every defense: output defenses served by the API, stateful detectors, the training-time defense
(Adversarial Sparse Teacher) and the data-release defense (Self-Ensemble Protection).

May import ``common``; never ``server`` or ``attacker_client``.
"""
