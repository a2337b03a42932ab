from eglp_dist.cli import main

raise SystemExit(main())
