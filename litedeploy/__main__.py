from litedeploy.cli.main import main

raise SystemExit(main())
