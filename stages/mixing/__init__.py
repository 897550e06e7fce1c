"""Helpers of ``stages/mix.py``: example formats (:mod:`.formats`) and the hashing behind
dedup and decontamination (:mod:`.hashing`)."""
