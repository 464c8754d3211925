"""``python -m vitkit`` (what ``torchrun ... -m vitkit train`` runs)."""

from vitkit.cli import run

if __name__ == "__main__":
    run()
