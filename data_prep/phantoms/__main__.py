"""`make phantoms`: python3 -m data_prep.phantoms --out DIR [--n 20 --seed 0 --jobs J --size 512]."""
import sys

from data_prep.phantoms.cohort import main

sys.exit(main())
