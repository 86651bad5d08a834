"""The worker runtime, one layer above the client: worker loops, listener retry and
readiness, request/reply, and hosts of many workers in one process.

Its public names are re-exported by :mod:`busevents`; import them from there.
"""
