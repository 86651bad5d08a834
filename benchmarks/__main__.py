"""``python -m benchmarks``: run every row of the table, print it, write JSON."""

from ._harness import main

raise SystemExit(main())
