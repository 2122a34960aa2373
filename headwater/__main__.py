import os

# One BLAS thread per process: the services share two cores, and threaded OpenBLAS on
# small matrices (codebooks, alignment) was ~25x slower under that contention.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from headwater.cli import main  # noqa: E402

raise SystemExit(main())
