"""``python -m gradaccum_torch.demo``: see `gradaccum_torch.demo`."""

from __future__ import annotations

from gradaccum_torch.demo import main

raise SystemExit(main())
