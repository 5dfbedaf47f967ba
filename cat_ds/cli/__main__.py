"""`python -m cat_ds.cli ...` is `cat-ds ...`."""
from cat_ds.cli import main

main()
