"""``python -m sqakd`` (also what ``torchrun -m sqakd`` runs)."""

from .cli import main

main()
