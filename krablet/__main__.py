from krablet.cli import main

raise SystemExit(main())
