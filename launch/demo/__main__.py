import sys

from launch.demo.demo import main

sys.exit(main())
