import sys

from innova_smollm.cli import main

sys.exit(main())
