"""``python -m ddpm_lib train | sample | bpd | info`` (see :mod:`ddpm_lib.cli`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
