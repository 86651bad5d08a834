"""``python -m busevents``: the ``bus-events`` command line."""

from busevents.cli import console_main

if __name__ == "__main__":
    console_main()
