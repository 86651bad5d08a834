# Recipes for busevents. Nothing here needs `just`: each recipe is one plain command.

venv := ".venv"
py := venv + "/bin/python"

# Create the virtual environment with everything the tests need.
setup:
    python3 -m venv {{venv}}
    {{py}} -m pip install -q -e '.[test,lint]'

# The whole test suite (the command CI runs, see .ci/run).
test: setup
    {{py}} -m pytest --cov

# The end-to-end demo against the embedded reference provider.
demo: setup
    {{venv}}/bin/bus-events demo

# The benchmark harness.
bench: setup
    {{py}} -m pip install -q -e '.[bench]'
    {{py}} -m benchmarks

# Lint, format check and strict typing.
lint: setup
    {{py}} -m ruff check src tests
    {{py}} -m ruff format --check src tests
    {{py}} -m mypy
