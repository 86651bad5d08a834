"""The busevents benchmark harness (issue 3): ``python -m benchmarks``.

See ``benchmarks/README.md`` for what each row means and the latest table.
"""
