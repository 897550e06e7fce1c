"""DVC pipeline stages for the Korean financial LLM.

One module per stage (``python -m stages.<name> <key>`` runs ``<name>@<key>`` and reads
``params.<name>.<key>``); shared helpers live in :mod:`stages.common`, source loaders in
:mod:`stages.sources`.
"""
