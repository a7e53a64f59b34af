from onnx_cp.cli import main

raise SystemExit(main())
