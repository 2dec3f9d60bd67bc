from torch_hod.cli import main

raise SystemExit(main())
