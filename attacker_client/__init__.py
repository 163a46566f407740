"""The attacker side: the httpx SDK of the victim API and the attacks run through it.

Knows the victim only through its HTTP API: never imports ``server``.
"""
