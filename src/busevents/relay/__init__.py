"""The relay, ``import`` and their state: moving events between deployments, each once.

A leaf over the SDK (it uses the client, never the workers).  Its public names
are re-exported by :mod:`busevents`; import them from there.
"""
