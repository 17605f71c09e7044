import sys

from ray_jobs.ensemble.stage import main

sys.exit(main())
