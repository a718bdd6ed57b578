from via_tunnel.cli import main

raise SystemExit(main())
