"""`python -m nnslim ...`: the same command line as the `nnslim` executable."""

from nnslim.compiler.cli import main

if __name__ == "__main__":
    main()
