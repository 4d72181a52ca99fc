"""`python -m ovdiff_ray.label ...` = `label_dataset ...`."""
import sys

from .job import main

sys.exit(main())
