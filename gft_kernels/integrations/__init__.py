"""Thin layers of the library for other frameworks, each imported only when used.

    verl.py   the fused log-prob + entropy op in the place of verl's ``linear_cross_entropy``

The trainer-side integrations (verl's policy loss, TRL's trainer) live in
``gft_train.integrations``, which imports these.
"""
