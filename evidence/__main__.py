"""`python -m evidence`: the analyses of main.py (`python -m evidence --help` lists their keys)."""

import sys

import jobs
from evidence.main import main

sys.exit(jobs.run_script(main, sys.argv[1:]))
