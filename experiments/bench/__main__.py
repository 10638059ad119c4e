"""python -m experiments.bench: see experiments/bench/__init__.py."""

from experiments.bench import main

if __name__ == "__main__":
    main()
