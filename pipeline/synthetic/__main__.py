"""``python -m pipeline.synthetic KIND OUTDIR ...``: see :mod:`pipeline.synthetic.cli`."""

from pipeline.synthetic.cli import main

if __name__ == "__main__":
    main()
