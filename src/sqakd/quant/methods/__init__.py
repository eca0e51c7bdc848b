"""One file per QAT method; importing this package registers them all."""

from . import apot, binary, dorefa, dsq, ewgs, lsq, minmax, pact  # noqa: F401
