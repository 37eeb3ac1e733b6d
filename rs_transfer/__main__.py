from rs_transfer.cli import main

raise SystemExit(main())
