"""What every Headwater package shares: settings, health documents, small network helpers.

The leaf of the import graph: ``core`` imports no other Headwater package, and every
other package may import it (``docs/architecture.md``).
"""
