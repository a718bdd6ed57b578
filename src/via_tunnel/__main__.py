from via_tunnel.cli.main import main

raise SystemExit(main())
