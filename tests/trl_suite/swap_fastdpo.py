"""pytest plugin (``-p swap_fastdpo``) that puts fastdpo in place in TRL's own test files, chosen by ``FASTDPO_SWAP``:

- ``stock`` (or unset): nothing changes;
- ``patch``: :func:`fastdpo.integrations.trl.patch_trl` for the whole session (every TRL trainer that builds a fused
  head builds fastdpo's);
- ``trainer``: ``trl.DPOTrainer`` is :class:`~fastdpo.integrations.trl.FastDPOTrainer` (test files that import it
  from ``trl`` get ours).

With ``patch`` and ``trainer`` TRL's own ``ChunkedLogProbFunction`` raises, so a test that still reaches it fails.
"""

import os

MODE = os.environ.get("FASTDPO_SWAP", "stock")

if MODE == "trainer":
    import trl

    from fastdpo.integrations.trl import FastDPOTrainer

    trl.DPOTrainer = FastDPOTrainer
elif MODE == "patch":
    from fastdpo.integrations.trl import patch_trl

    patch_trl()
elif MODE != "stock":
    raise ValueError(f"FASTDPO_SWAP must be stock, patch or trainer, got {MODE!r}")

if MODE != "stock":
    from fastdpo.integrations import _trl_patch

    def _forbidden(*args, **kwargs):
        raise AssertionError("TRL's own ChunkedLogProbFunction ran where fastdpo's head should")

    _trl_patch._TRL_FUNCTION.forward = staticmethod(_forbidden)
