"""``python -m mol.train [hydra overrides]``."""

from mol.train.app import main

if __name__ == "__main__":
    main()
