"""What the victim and the attacker share: architectures, datasets, views, training, metrics, checkpoints.

``common`` imports neither ``server``, ``attacker_client``, ``defenses`` nor ``experiments``.
"""
